// Validation and dispatch of the fused update (the middle of the three native layers).
#include "launcher.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "fused_update_cpu_entry.h"

namespace pyengine {

#if defined(PYENGINE_WITH_CUDA)
// csrc/cuda/fused_update.cu
void launch_fused_update_cuda(const FusedUpdateArgs& a, int device, uintptr_t stream);
#endif

namespace {

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

void check_dtype(int code, const std::string& name) {
  if (!valid_dtype(code)) {
    fail(name + " has unknown dtype code " + std::to_string(code) +
         " (0 float32, 1 float64, 2 float16, 3 bfloat16)");
  }
}

struct Range {
  uintptr_t lo, hi;
  int dtype;
};

Range range_of(const void* p, int dtype, int64_t numel) {
  const auto lo = reinterpret_cast<uintptr_t>(p);
  return Range{lo, lo + static_cast<uintptr_t>(numel) * dtype_size(dtype), dtype};
}

// An output may be exactly an input (in-place update) but never overlap one partially.
void check_overlap(const Range& o, const std::string& oname, const Range& in,
                   const std::string& iname, bool identical_ok) {
  const bool overlap = o.lo < in.hi && in.lo < o.hi;
  if (!overlap) return;
  if (identical_ok && o.lo == in.lo && o.dtype == in.dtype) return;
  fail(oname + " overlaps " + iname +
       (identical_ok ? " without being the same array (it may alias one input exactly)"
                     : " (they must be distinct arrays)"));
}

}  // namespace

void validate_fused_update(const FusedUpdateArgs& a) {
  if (a.K < 1 || a.K > kKMax) {
    fail("bufs must hold 1 to " + std::to_string(kKMax) + " arrays, got " + std::to_string(a.K));
  }
  if (a.batch < 0 || a.numel < 0) fail("batch and numel must be non-negative");
  if (a.numel > 0 && a.batch > (int64_t(1) << 60) / a.numel) fail("batch * numel overflows");
  check_dtype(a.out_dtype, "out");
  for (int k = 0; k < a.K; ++k) check_dtype(a.buf_dtypes[k], "bufs[" + std::to_string(k) + "]");
  if (a.aux) check_dtype(a.aux_dtype, "aux_out");
  if (a.noise_mode != kNoNoise && a.noise_mode != kPhiloxNoise && a.noise_mode != kTensorNoise) {
    fail("noise_mode must be 0 (none), 1 (Philox) or 2 (tensor), got " +
         std::to_string(a.noise_mode));
  }
  if (a.noise_mode == kTensorNoise) check_dtype(a.noise_dtype, "noise");
  if (a.mask) check_dtype(a.mask_dtype, "mask");
  const int64_t n = a.batch * a.numel;
  if (n == 0) return;

  if (!a.out) fail("out is a null pointer");
  for (int k = 0; k < a.K; ++k) {
    if (!a.bufs[k]) fail("bufs[" + std::to_string(k) + "] is a null pointer");
  }
  if (a.noise_mode == kPhiloxNoise && !a.seeds) fail("seeds is a null pointer (Philox noise)");
  if (a.noise_mode == kTensorNoise && !a.noise) fail("noise is a null pointer");

  const Range out = range_of(a.out, a.out_dtype, n);
  for (int k = 0; k < a.K; ++k) {
    const Range in = range_of(a.bufs[k], a.buf_dtypes[k], n);
    const std::string name = "bufs[" + std::to_string(k) + "]";
    check_overlap(out, "out", in, name, true);
    if (a.aux) check_overlap(range_of(a.aux, a.aux_dtype, n), "aux_out", in, name, true);
  }
  if (a.noise_mode == kTensorNoise) {
    const Range z = range_of(a.noise, a.noise_dtype, n);
    check_overlap(out, "out", z, "noise", true);
    if (a.aux) check_overlap(range_of(a.aux, a.aux_dtype, n), "aux_out", z, "noise", true);
  }
  if (a.aux) check_overlap(range_of(a.aux, a.aux_dtype, n), "aux_out", out, "out", false);
  if (a.mask) {  // read while out and aux are written: no aliasing at all
    const Range m = range_of(a.mask, a.mask_dtype, n);
    check_overlap(out, "out", m, "mask", false);
    if (a.aux) check_overlap(range_of(a.aux, a.aux_dtype, n), "aux_out", m, "mask", false);
  }
}

namespace {

bool cpu_has_avx2() {
#if defined(PYENGINE_HAVE_AVX2_KERNEL) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

enum Isa : int { kBaseline = 0, kAvx2 = 1 };

// The instruction set of the CPU kernel in use: the best the CPU runs, or as set.
int& cpu_isa_state() {
  static int isa = cpu_has_avx2() ? kAvx2 : kBaseline;
  return isa;
}

}  // namespace

std::vector<std::string> cpu_isas() {
  std::vector<std::string> out{"baseline"};
  if (cpu_has_avx2()) out.push_back("avx2");
  return out;
}

std::string cpu_isa() { return cpu_isa_state() == kAvx2 ? "avx2" : "baseline"; }

std::string set_cpu_isa(const std::string& isa) {
  const auto have = cpu_isas();
  if (std::find(have.begin(), have.end(), isa) == have.end()) {
    fail("cpu isa must be one of this build and CPU's: baseline" +
         std::string(have.size() > 1 ? ", avx2" : "") + "; got '" + isa + "'");
  }
  std::string prev = cpu_isa();
  cpu_isa_state() = isa == "avx2" ? kAvx2 : kBaseline;
  return prev;
}

void fused_update_cpu(const FusedUpdateArgs& a, int num_threads) {
  validate_fused_update(a);
#if defined(PYENGINE_HAVE_AVX2_KERNEL)
  if (cpu_isa_state() == kAvx2) return cpu::avx2::fused_update(a, num_threads);
#endif
  cpu::baseline::fused_update(a, num_threads);
}

bool cuda_compiled() {
#if defined(PYENGINE_WITH_CUDA)
  return true;
#else
  return false;
#endif
}

void fused_update_cuda(const FusedUpdateArgs& a, int device, uintptr_t stream) {
#if defined(PYENGINE_WITH_CUDA)
  validate_fused_update(a);
  if (device < 0) fail("device must be a CUDA device index, got " + std::to_string(device));
  launch_fused_update_cuda(a, device, stream);
#else
  (void)a;
  (void)device;
  (void)stream;
  throw std::runtime_error("pyengine._C was built without CUDA (no CUDA compiler was found)");
#endif
}

void philox_normal_cpu(float* out, const uint64_t* seeds, int64_t batch, int64_t numel,
                       uint32_t step) {
  if (batch < 0 || numel < 0) fail("batch and numel must be non-negative");
  if (batch * numel == 0) return;
  if (!out || !seeds) fail("out and seeds must be non-null");
#if defined(PYENGINE_HAVE_AVX2_KERNEL)
  if (cpu_isa_state() == kAvx2) return cpu::avx2::philox_normal(out, seeds, batch, numel, step);
#endif
  cpu::baseline::philox_normal(out, seeds, batch, numel, step);
}

void philox_words_cpu(uint32_t* out, uint64_t seed, uint32_t step, uint64_t q0, int64_t nq) {
  if (nq < 0) fail("nq must be non-negative");
  if (nq == 0) return;
  if (!out) fail("out must be non-null");
#if defined(PYENGINE_HAVE_AVX2_KERNEL)
  if (cpu_isa_state() == kAvx2) return cpu::avx2::philox_words(out, seed, step, q0, nq);
#endif
  cpu::baseline::philox_words(out, seed, step, q0, nq);
}

}  // namespace pyengine
