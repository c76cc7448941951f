// The fused update on CUDA (DESIGN.md s.5): one kernel serves every solver's plan.
//
//   out = sum_k c_k * buf_k + c_z * z          aux = sum_k a_k * buf_k   (optional)
//
// A grid-stride loop over packs of VEC = 16 / sizeof(T) consecutive elements of one sample:
// every buffer is read with one 16-byte load per pack, out (and aux) written with one store,
// the noise z made in registers from Philox (csrc/fused_update/philox.h, the same header as
// the CPU kernel). K is a template parameter (1..K_MAX), so the K loads of a pack are
// independent and in flight together. Coefficients come by value (per step) or from a
// [batch, K] float64 table in device memory (per sample). Launched on the caller's stream.
//
// Types: buffers share one storage type T, out and aux one type TO; the arithmetic is in C
// (float, or double for double storage). The Python backend converts other mixes first.
// Unaligned arrays, or a per-sample size that is no multiple of VEC, take the scalar
// (VEC = 1, runtime K) instantiation of the same kernel.
//
// Per-sample draw numbers: with a steps array, sample b's noise is keyed by (seeds[b],
// steps[b]) (one load per pack, from L1/L2), else by (seeds[b], step). The inpainting blend
// (MASK, a template flag: the unmasked kernels are unchanged) accumulates base = sum_k b_k x_k
// beside the result and stores m * res + (1 - m) * base; the mask is read in its own dtype (a
// warp-uniform switch) in packs of VEC, converted to C in registers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../fused_update/fused_update.h"
#include "../fused_update/philox.h"

namespace pyengine {
namespace cuda {

constexpr int kThreads = 256;

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <class C>
__device__ __forceinline__ C ld(float x) { return static_cast<C>(x); }
template <class C>
__device__ __forceinline__ C ld(double x) { return static_cast<C>(x); }
template <class C>
__device__ __forceinline__ C ld(__half x) { return static_cast<C>(__half2float(x)); }
template <class C>
__device__ __forceinline__ C ld(__nv_bfloat16 x) { return static_cast<C>(__bfloat162float(x)); }

template <class T>
struct St;
template <>
struct St<float> {
  template <class C>
  __device__ __forceinline__ static float from(C v) { return static_cast<float>(v); }
};
template <>
struct St<double> {
  template <class C>
  __device__ __forceinline__ static double from(C v) { return static_cast<double>(v); }
};
template <>
struct St<__half> {
  template <class C>
  __device__ __forceinline__ static __half from(C v) {
    return __float2half_rn(static_cast<float>(v));
  }
};
template <>
struct St<__nv_bfloat16> {
  template <class C>
  __device__ __forceinline__ static __nv_bfloat16 from(C v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
};

struct Params {
  const void* bufs[kKMax];
  void* out;
  void* aux;
  double coef[kKMax];
  double aux_coef[kKMax];
  const double* coef_table;
  const double* aux_coef_table;
  const double* noise_coef_table;
  const uint64_t* seeds;
  const int64_t* steps;  // per-sample draw numbers [batch] or nullptr (then `step`)
  const void* noise;  // compute type C, [batch, numel]
  const void* mask;   // [batch, numel] in mask_dtype, MASK kernels only
  double mask_coef[kKMax];
  const double* mask_coef_table;
  double noise_coef;
  int64_t numel;
  int64_t packs;  // batch * numel / VEC
  int K;
  int noise_mode;
  int mask_dtype;
  uint32_t step;
};

// The mask's pack at element e, converted to C.
template <class TM, class C, int VEC>
__device__ __forceinline__ void load_pack(C (&m)[VEC], const void* ptr, int64_t e) {
  const Pack<TM, VEC> x =
      *reinterpret_cast<const Pack<TM, VEC>*>(static_cast<const TM*>(ptr) + e);
#pragma unroll
  for (int i = 0; i < VEC; ++i) m[i] = ld<C>(x.v[i]);
}

template <class C, int VEC>
__device__ __forceinline__ void load_mask(C (&m)[VEC], const void* ptr, int dtype, int64_t e) {
  switch (dtype) {
    case kFloat32: load_pack<float, C, VEC>(m, ptr, e); break;
    case kFloat64: load_pack<double, C, VEC>(m, ptr, e); break;
    case kFloat16: load_pack<__half, C, VEC>(m, ptr, e); break;
    default: load_pack<__nv_bfloat16, C, VEC>(m, ptr, e); break;
  }
}

// The normals of elements j..j+VEC-1 (j a multiple of VEC) into z.
template <int VEC>
__device__ __forceinline__ void philox_pack(float (&z)[VEC], uint64_t seed, uint32_t step,
                                            int64_t j) {
  if constexpr (VEC >= 4) {
#pragma unroll
    for (int g = 0; g < VEC / 4; ++g) {
      float q[4];
      philox::box_muller4(philox::quad_words(seed, step, static_cast<uint64_t>(j / 4 + g)), q);
#pragma unroll
      for (int r = 0; r < 4; ++r) z[4 * g + r] = q[r];
    }
  } else {
    float q[4];
    philox::box_muller4(philox::quad_words(seed, step, static_cast<uint64_t>(j / 4)), q);
    const int r0 = static_cast<int>(j & 3);
#pragma unroll
    for (int i = 0; i < VEC; ++i) z[i] = q[r0 + i];
  }
}

// KT = K (1..K_MAX) or 0 for a runtime K (the scalar fallback); MASK: the inpainting blend.
template <int KT, class T, class TO, class C, int VEC, bool MASK>
__global__ void __launch_bounds__(kThreads) fused_update_kernel(const Params p) {
  constexpr int KM = KT > 0 ? KT : kKMax;
  const int K = KT > 0 ? KT : p.K;
  const bool has_aux = p.aux != nullptr;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < p.packs;
       v += stride) {
    const int64_t e = v * VEC;  // flat element index; the pack lies inside one sample
    const int64_t b = e / p.numel;
    const int64_t j = e - b * p.numel;

    // load every buffer's pack (independent 16-byte loads) and fold it in
    C acc[VEC], aux[VEC], base[VEC];
#pragma unroll
    for (int k = 0; k < KM; ++k) {
      if (k >= K) break;
      const C c = static_cast<C>(p.coef_table ? p.coef_table[b * K + k] : p.coef[k]);
      const Pack<T, VEC> x = *reinterpret_cast<const Pack<T, VEC>*>(
          static_cast<const T*>(p.bufs[k]) + e);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const C xv = ld<C>(x.v[i]);
        acc[i] = k == 0 ? c * xv : acc[i] + c * xv;
      }
      if (has_aux) {
        const C a = static_cast<C>(p.aux_coef_table ? p.aux_coef_table[b * K + k]
                                                    : p.aux_coef[k]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const C xv = ld<C>(x.v[i]);
          aux[i] = k == 0 ? a * xv : aux[i] + a * xv;
        }
      }
      if constexpr (MASK) {
        const C bk = static_cast<C>(p.mask_coef_table ? p.mask_coef_table[b * K + k]
                                                      : p.mask_coef[k]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          const C xv = ld<C>(x.v[i]);
          base[i] = k == 0 ? bk * xv : base[i] + bk * xv;
        }
      }
    }

    // the noise term, generated in registers (or read)
    if (p.noise_mode != kNoNoise) {
      const C cz = static_cast<C>(p.noise_coef_table ? p.noise_coef_table[b] : p.noise_coef);
      if (p.noise_mode == kPhiloxNoise) {
        float z[VEC];
        const uint32_t step = p.steps ? static_cast<uint32_t>(p.steps[b]) : p.step;
        philox_pack<VEC>(z, p.seeds[b], step, j);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += cz * static_cast<C>(z[i]);
      } else {
        const C* zp = static_cast<const C*>(p.noise) + e;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += cz * zp[i];
      }
    }

    // the blend with the known region: out = m res + (1 - m) base
    if constexpr (MASK) {
      C m[VEC];
      load_mask<C, VEC>(m, p.mask, p.mask_dtype, e);
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = m[i] * acc[i] + (C(1) - m[i]) * base[i];
    }

    // one store per output
    Pack<TO, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = St<TO>::from(acc[i]);
    *reinterpret_cast<Pack<TO, VEC>*>(static_cast<TO*>(p.out) + e) = o;
    if (has_aux) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) o.v[i] = St<TO>::from(aux[i]);
      *reinterpret_cast<Pack<TO, VEC>*>(static_cast<TO*>(p.aux) + e) = o;
    }
  }
}

int sm_count(int device) {
  static int cached[64] = {};
  if (device < 64 && cached[device]) return cached[device];
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || n < 1) {
    n = 80;
  }
  if (device < 64) cached[device] = n;
  return n;
}

bool aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <class T, class TO, class C, bool MASK>
void launch_k(const FusedUpdateArgs& a, const Params& p, bool vec, dim3 grid,
              cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  if (!vec) {
    fused_update_kernel<0, T, TO, C, 1, MASK><<<grid, kThreads, 0, stream>>>(p);
    return;
  }
  switch (a.K) {
    case 1: fused_update_kernel<1, T, TO, C, VEC, MASK><<<grid, kThreads, 0, stream>>>(p); break;
    case 2: fused_update_kernel<2, T, TO, C, VEC, MASK><<<grid, kThreads, 0, stream>>>(p); break;
    case 3: fused_update_kernel<3, T, TO, C, VEC, MASK><<<grid, kThreads, 0, stream>>>(p); break;
    case 4: fused_update_kernel<4, T, TO, C, VEC, MASK><<<grid, kThreads, 0, stream>>>(p); break;
    case 5: fused_update_kernel<5, T, TO, C, VEC, MASK><<<grid, kThreads, 0, stream>>>(p); break;
    case 6: fused_update_kernel<6, T, TO, C, VEC, MASK><<<grid, kThreads, 0, stream>>>(p); break;
    case 7: fused_update_kernel<7, T, TO, C, VEC, MASK><<<grid, kThreads, 0, stream>>>(p); break;
    default: fused_update_kernel<8, T, TO, C, VEC, MASK><<<grid, kThreads, 0, stream>>>(p); break;
  }
  static_assert(kKMax == 8, "add the cases above when K_MAX changes");
}

template <class T, class TO, class C>
void launch_typed(const FusedUpdateArgs& a, Params& p, int device, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  const int64_t n = a.batch * a.numel;
  bool vec = a.numel % VEC == 0 && aligned(a.out, sizeof(TO) * VEC) &&
             (!a.aux || aligned(a.aux, sizeof(TO) * VEC)) &&
             (!a.mask || aligned(a.mask, static_cast<size_t>(dtype_size(a.mask_dtype)) * VEC));
  for (int k = 0; k < a.K; ++k) vec = vec && aligned(a.bufs[k], 16);
  p.packs = vec ? n / VEC : n;
  // one resident wave (8 blocks of 256 threads fill an SM's 2048 threads at <= 64 registers,
  // ptxas reports 28-48); the grid-stride loop does the rest
  const int64_t want = (p.packs + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count(device)) * 8;
  const dim3 grid(static_cast<unsigned>(want < cap ? want : cap));
  if (a.mask) {
    launch_k<T, TO, C, true>(a, p, vec, grid, stream);
  } else {
    launch_k<T, TO, C, false>(a, p, vec, grid, stream);
  }
}

// Makes `device` current for the launch and restores the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&prev_);
    if (prev_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    cudaGetDevice(&now);
    if (now != prev_) cudaSetDevice(prev_);
  }

 private:
  int prev_ = 0;
};

}  // namespace cuda

void launch_fused_update_cuda(const FusedUpdateArgs& a, int device, uintptr_t stream_handle) {
  using namespace cuda;
  if (a.batch * a.numel == 0) return;
  for (int k = 1; k < a.K; ++k) {
    if (a.buf_dtypes[k] != a.buf_dtypes[0]) {
      throw std::invalid_argument("the CUDA kernel needs every buffer in one dtype");
    }
  }
  if (a.aux && a.aux_dtype != a.out_dtype) {
    throw std::invalid_argument("the CUDA kernel needs aux_out in out's dtype");
  }
  const int in = a.buf_dtypes[0], out = a.out_dtype;
  const bool f64 = in == kFloat64;
  if (a.compute_f64 != f64 || (f64 && out != kFloat64)) {
    throw std::invalid_argument("the CUDA kernel computes in float64 exactly for float64 "
                                "buffers and output");
  }
  if (a.noise_mode == kTensorNoise && a.noise_dtype != (f64 ? kFloat64 : kFloat32)) {
    throw std::invalid_argument("the CUDA kernel reads noise in the compute dtype");
  }

  Params p{};
  for (int k = 0; k < a.K; ++k) {
    p.bufs[k] = a.bufs[k];
    p.coef[k] = a.coef[k];
    p.aux_coef[k] = a.aux_coef[k];
    p.mask_coef[k] = a.mask_coef[k];
  }
  p.out = a.out;
  p.aux = a.aux;
  p.coef_table = a.coef_table;
  p.aux_coef_table = a.aux_coef_table;
  p.noise_coef_table = a.noise_coef_table;
  p.seeds = a.seeds;
  p.steps = a.steps;
  p.noise = a.noise;
  p.mask = a.mask;
  p.mask_dtype = a.mask_dtype;
  p.mask_coef_table = a.mask_coef_table;
  p.noise_coef = a.noise_coef;
  p.numel = a.numel;
  p.K = a.K;
  p.noise_mode = a.noise_mode;
  p.step = a.step;

  DeviceGuard guard(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  if (in == kFloat64) {
    launch_typed<double, double, double>(a, p, device, stream);
  } else if (in == kFloat32 && out == kFloat32) {
    launch_typed<float, float, float>(a, p, device, stream);
  } else if (in == kFloat32 && out == kFloat16) {
    launch_typed<float, __half, float>(a, p, device, stream);
  } else if (in == kFloat32 && out == kBFloat16) {
    launch_typed<float, __nv_bfloat16, float>(a, p, device, stream);
  } else if (in == kFloat16 && out == kFloat16) {
    launch_typed<__half, __half, float>(a, p, device, stream);
  } else if (in == kBFloat16 && out == kBFloat16) {
    launch_typed<__nv_bfloat16, __nv_bfloat16, float>(a, p, device, stream);
  } else {
    throw std::invalid_argument(std::string("the CUDA kernel has no ") + dtype_name(in) + " -> " +
                                dtype_name(out) + " instantiation");
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fused_update CUDA launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace pyengine
