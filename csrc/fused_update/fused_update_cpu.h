// The fused update on the CPU: torch-free, over raw pointers (validated by launcher.cpp).
//
//   out = sum_k c_k * buf_k + c_z * z          aux = sum_k a_k * buf_k
//   (with a mask m: out = m * out + (1 - m) * sum_k b_k * buf_k, see fused_update.h)
//
// The [batch, numel] arrays are walked in tiles of one sample's elements (the tasks that
// thread_pool.h hands out), each tile in blocks small enough for L1. The fast path (one storage
// dtype, K a template parameter) computes each element in registers in one loop over all K
// inputs. The general path folds a block of every buffer into a compute-type accumulator by one
// simple loop per buffer (the compiler vectorizes each; the dtype switch runs once per block,
// not per element, so buffers may mix storage dtypes). Either way the noise block is generated
// in L1 and every input element is read before its output element is written, so `out` (or
// `aux`) may be the very array of an input. Large outputs leave in non-temporal stores.
//
// A masked (inpainting) update takes the block path, with base = sum_k b_k x_k folded from
// the same read of each block and the blend done per block. A K=3 float32 16x4x128x128
// update on one EPYC thread (AVX2 build, median): 1100 us unmasked (fast path), 1950 us
// masked. A masked fast path (a template flag) ran it in 1300 us but more than doubled the
// compile time of this header (17 -> 39 s per instruction set, 32 -> 73 s sanitized).
//
// This header is compiled once per instruction set (fused_update_cpu.cpp baseline x86-64 and
// fused_update_cpu_avx2.cpp with AVX2/FMA/F16C, picked at run time), so everything here has
// internal linkage: an anonymous namespace, and `static` helpers in dtypes.h / philox.h.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#if defined(__has_include)
#if __has_include(<unistd.h>)
#include <unistd.h>
#endif
#endif

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "dtypes.h"
#include "fused_update.h"
#include "normal.h"
#include "philox.h"
#include "thread_pool.h"

namespace pyengine {
namespace cpu {
namespace {

// 256 elements per block: accumulator, aux, noise and a conversion buffer take 8 KiB in
// float64, well inside L1 (32 KiB). 256 ran 11.5 GB/s, 1024 9.6 and 4096 8.0 GB/s for the
// (16,4,128,128) float32 DDIM update on the 2-core EPYC.
constexpr int64_t kBlock = 256;
// The tasks of a parallel update (thread_pool.h hands them out one at a time): tiles of 8 K
// elements of one sample (32 KiB of float32 per buffer, a few microseconds), small so that a
// worker that joins late, or a caller that finds no worker awake, leaves little to wait for;
// 4 K with the Philox noise. The serial path walks the same tiles (the per-tile cost is a few
// coefficient loads).
constexpr int64_t kTile = 8192;
constexpr int64_t kTileNoise = 4096;
// Updates smaller than this run on the calling thread alone. Waking a sleeping worker costs
// 10-20 us in the KVM guest (futex wake and the vCPU's way back from idle), so two threads pay
// only from about 100 us of work. Measured on the 2-core Xeon guest, float32 K=2, median us,
// 1 -> 2 threads, quiet: 2^15 elements 5.5 -> 7.3-15 (slower), 2^16 10-11 -> 17-20, 2^17 24 ->
// 26-28, 2^18 102 -> 59-72, 2^19 272-428 -> 166-216, 2^20 580-660 -> 325-390. The noise costs
// about 1 ns per element more (AVX-512), so noisy updates reach 100 us from 2^16 elements.
constexpr int64_t kParallelMinElements = int64_t(1) << 18;
constexpr int64_t kParallelMinElementsNoise = int64_t(1) << 16;
// Non-temporal stores for outputs whose update cannot stay in the last-level cache: skipping
// the read-for-ownership of each output line moves 25% less data for a K=2 update (12.2 ->
// 16.3 GB/s on an EPYC with 8 MiB of L3, copy 16.8). Where the whole update (K inputs and
// the outputs) fits in the cache, the output is read back by the next step of the sampling
// loop, so it must stay there: streamed, a 16x4x128x128 float32 K=2 ping-pong step took
// 730-860 us against 430-520 us written normally on the 2-vCPU Xeon (260 MiB L3).
// The cache size comes from the C library (sysconf); unknown, the EPYC's 8 MiB is assumed.
constexpr int64_t kDefaultLastLevelCache = int64_t(8) << 20;

inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    long v = -1;
#if defined(_SC_LEVEL3_CACHE_SIZE)
    v = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
#if defined(_SC_LEVEL2_CACHE_SIZE)
    if (v <= 0) v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? static_cast<int64_t>(v) : kDefaultLastLevelCache;
  }();
  return bytes;
}

inline bool stream_outputs(const FusedUpdateArgs& a) {
  const int64_t n = a.batch * a.numel;
  int64_t bytes = n * dtype_size(a.out_dtype) * (a.aux ? 2 : 1);
  for (int k = 0; k < a.K; ++k) bytes += n * dtype_size(a.buf_dtypes[k]);
  return bytes > last_level_cache_bytes();
}

// ---- element conversions -------------------------------------------------------------------

template <class C>
inline C load(float x) { return static_cast<C>(x); }
template <class C>
inline C load(double x) { return static_cast<C>(x); }
template <class C>
inline C load(Half x) { return static_cast<C>(half_to_float(x.bits)); }
template <class C>
inline C load(BFloat16 x) { return static_cast<C>(bf16_to_float(x.bits)); }

template <class T>
struct Store;
template <>
struct Store<float> {
  template <class C>
  static float from(C v) { return static_cast<float>(v); }
};
template <>
struct Store<double> {
  template <class C>
  static double from(C v) { return static_cast<double>(v); }
};
template <>
struct Store<Half> {
  // double -> half goes through float, as torch's conversion does
  template <class C>
  static Half from(C v) { return Half{float_to_half(static_cast<float>(v))}; }
};
template <>
struct Store<BFloat16> {
  template <class C>
  static BFloat16 from(C v) { return BFloat16{float_to_bf16(static_cast<float>(v))}; }
};

template <class F>
inline void with_storage_type(int code, F&& f) {
  switch (code) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    case kFloat16: f(Half{}); break;
    default: f(BFloat16{}); break;
  }
}

// ---- block loops: each one simple enough for the vectorizer ----------------------------------

// acc = c * x
template <class T, class C>
inline void scale_block(C* __restrict acc, const T* __restrict x, C c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] = c * load<C>(x[i]);
}

// acc += c * x
template <class T, class C>
inline void axpy_block(C* __restrict acc, const T* __restrict x, C c, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += c * load<C>(x[i]);
}

// acc (+)= c * x and aux (+)= a * x from one read of x
template <class T, class C>
inline void axpy2_block(C* __restrict acc, C* __restrict aux, const T* __restrict x, C c, C a,
                        int64_t n, bool first) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) {
      const C v = load<C>(x[i]);
      acc[i] = c * v;
      aux[i] = a * v;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const C v = load<C>(x[i]);
      acc[i] += c * v;
      aux[i] += a * v;
    }
  }
}

// acc (+)= c * x, aux (+)= a * x and base (+)= mc * x from one read of x (masked updates)
template <class T, class C>
inline void axpy3_block(C* __restrict acc, C* __restrict aux, C* __restrict base,
                        const T* __restrict x, C c, C a, C mc, int64_t n, bool first) {
  if (first) {
    for (int64_t i = 0; i < n; ++i) {
      const C v = load<C>(x[i]);
      acc[i] = c * v;
      aux[i] = a * v;
      base[i] = mc * v;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const C v = load<C>(x[i]);
      acc[i] += c * v;
      aux[i] += a * v;
      base[i] += mc * v;
    }
  }
}

template <class T, class C>
inline void store_block(T* __restrict o, const C* __restrict acc, int64_t n) {
  for (int64_t i = 0; i < n; ++i) o[i] = Store<T>::from(acc[i]);
}

template <class T, class C>
inline void load_block(C* __restrict z, const T* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = load<C>(x[i]);
}

#if defined(__F16C__) && defined(__AVX__)
// float16 <-> float32 with the F16C instructions, 8 lanes at a time: the select-based scalar
// conversions vectorize too, but ran at 0.7 (to float) and 1.6 ns/element (from float).
inline void widen_half(float* __restrict f, const Half* __restrict h, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i));
    _mm256_storeu_ps(f + i, _mm256_cvtph_ps(v));
  }
  for (; i < n; ++i) f[i] = half_to_float(h[i].bits);
}

inline void narrow_half(Half* __restrict h, const float* __restrict f, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i v = _mm256_cvtps_ph(_mm256_loadu_ps(f + i), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i), v);
  }
  for (; i < n; ++i) h[i].bits = float_to_half(f[i]);
}
constexpr bool kHardwareHalf = true;
#else
inline void widen_half(float* __restrict f, const Half* __restrict h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) f[i] = half_to_float(h[i].bits);
}
inline void narrow_half(Half* __restrict h, const float* __restrict f, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i].bits = float_to_half(f[i]);
}
constexpr bool kHardwareHalf = false;
#endif

// Elements [off, off + n) of an array of storage dtype `dtype` (the mask), in the compute
// type: one switch per block; float16 through F16C where the build has it (`wide`: scratch).
template <class C>
inline void load_any_block(C* __restrict dst, const void* src, int dtype, int64_t off,
                           int64_t n, float* __restrict wide) {
  with_storage_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(src) + off;
    if constexpr (std::is_same_v<T, Half> && kHardwareHalf) {
      if constexpr (std::is_same_v<C, float>) {
        widen_half(dst, x, n);
      } else {
        widen_half(wide, x, n);
        load_block(dst, wide, n);
      }
    } else {
      load_block(dst, x, n);
    }
  });
}

// Copies with non-temporal stores (32 bytes with AVX, else 16) where dst is aligned to them;
// the unaligned ends are stored plainly.
inline void stream_copy(void* dst, const void* src, int64_t bytes) {
#if defined(__AVX__)
  constexpr int64_t kW = 32;
#elif defined(__SSE2__)
  constexpr int64_t kW = 16;
#endif
#if defined(__SSE2__)
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  int64_t head = static_cast<int64_t>((kW - (reinterpret_cast<uintptr_t>(d) & (kW - 1))) &
                                      (kW - 1));
  head = std::min(head, bytes);
  std::memcpy(d, s, static_cast<size_t>(head));
  d += head;
  s += head;
  bytes -= head;
  for (; bytes >= kW; bytes -= kW, d += kW, s += kW) {
#if defined(__AVX__)
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d),
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
#else
    _mm_stream_si128(reinterpret_cast<__m128i*>(d),
                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(s)));
#endif
  }
  std::memcpy(d, s, static_cast<size_t>(bytes));
#else
  std::memcpy(dst, src, static_cast<size_t>(bytes));
#endif
}

inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// ---- noise: Philox-4x32-10 + Box-Muller, vectorized over quads ------------------------------

// The words of quads q0 + i, i < nq, into w[r][i]: philox::philox4x32_10 on several quads at
// once. With AVX2, 64-bit lanes (see philox_words_soa: 1.5 -> ~0.8 ns per word on the Xeon
// guest); with SSE2 the 32x32 -> 64-bit products come from pmuludq on the even lanes and on
// the odd lanes shifted down (the compiler's own vectorization of the scalar rounds ran at
// 2.5-4.7 ns per element on the EPYC, the even/odd AVX2 form at about 1).
#if defined(__AVX2__)
using WordVec = __m256i;
constexpr int kWordLanes = 8;
inline WordVec wv_load(const uint32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline void wv_store(uint32_t* p, WordVec v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
}
inline WordVec wv_set1(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline WordVec wv_mul_even(WordVec a, WordVec b) { return _mm256_mul_epu32(a, b); }
inline WordVec wv_srl64(WordVec a) { return _mm256_srli_epi64(a, 32); }
inline WordVec wv_sll64(WordVec a) { return _mm256_slli_epi64(a, 32); }
inline WordVec wv_and(WordVec a, WordVec b) { return _mm256_and_si256(a, b); }
inline WordVec wv_or(WordVec a, WordVec b) { return _mm256_or_si256(a, b); }
inline WordVec wv_xor(WordVec a, WordVec b) { return _mm256_xor_si256(a, b); }
inline WordVec wv_add(WordVec a, WordVec b) { return _mm256_add_epi32(a, b); }
inline WordVec wv_lo_mask() { return _mm256_set1_epi64x(0x00000000FFFFFFFFll); }
#define PYENGINE_WORD_VECTORS 1
#elif defined(__SSE2__)
using WordVec = __m128i;
constexpr int kWordLanes = 4;
inline WordVec wv_load(const uint32_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}
inline void wv_store(uint32_t* p, WordVec v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), v); }
inline WordVec wv_set1(uint32_t x) { return _mm_set1_epi32(static_cast<int>(x)); }
inline WordVec wv_mul_even(WordVec a, WordVec b) { return _mm_mul_epu32(a, b); }
inline WordVec wv_srl64(WordVec a) { return _mm_srli_epi64(a, 32); }
inline WordVec wv_sll64(WordVec a) { return _mm_slli_epi64(a, 32); }
inline WordVec wv_and(WordVec a, WordVec b) { return _mm_and_si128(a, b); }
inline WordVec wv_or(WordVec a, WordVec b) { return _mm_or_si128(a, b); }
inline WordVec wv_xor(WordVec a, WordVec b) { return _mm_xor_si128(a, b); }
inline WordVec wv_add(WordVec a, WordVec b) { return _mm_add_epi32(a, b); }
inline WordVec wv_lo_mask() { return _mm_set1_epi64x(0x00000000FFFFFFFFll); }
#define PYENGINE_WORD_VECTORS 1
#endif

#if defined(PYENGINE_WORD_VECTORS)
// (hi, lo) 32-bit halves of m * a, lane by lane (m holds the multiplier in every lane).
inline void wv_mulhilo(WordVec a, WordVec m, WordVec& hi, WordVec& lo) {
  const WordVec mask = wv_lo_mask();
  const WordVec even = wv_mul_even(a, m);           // lanes 0, 2, ..: 64-bit products
  const WordVec odd = wv_mul_even(wv_srl64(a), m);  // lanes 1, 3, ..
  lo = wv_or(wv_and(even, mask), wv_sll64(odd));
  hi = wv_or(wv_srl64(even), wv_and(odd, wv_sll64(mask)));
}
#endif

inline void philox_words_soa(uint32_t (*w)[kBlock / 4], uint64_t seed, uint32_t step, uint64_t q0,
                             int64_t nq) {
  const uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  int64_t i = 0;
#if defined(__AVX2__)
  // 64-bit lanes, four quads per vector: one pmuludq gives a word's whole product, its high
  // half one shift away; the upper halves of the lanes carry garbage that no multiply or final
  // word reads (as in philox_words_avx512). 8 operations per round for 16 words instead of 24
  // for 32 with the even/odd split below.
  {
    __m256i rk0[philox::kRounds], rk1[philox::kRounds];
    uint32_t a0 = key0, a1 = key1;
    for (int r = 0; r < philox::kRounds; ++r) {
      rk0[r] = _mm256_set1_epi64x(a0);
      rk1[r] = _mm256_set1_epi64x(a1);
      a0 += philox::kW0;
      a1 += philox::kW1;
    }
    const __m256i m0 = _mm256_set1_epi64x(philox::kM0), m1 = _mm256_set1_epi64x(philox::kM1);
    const __m256i lanes = _mm256_set_epi64x(3, 2, 1, 0);
    const __m256i stepv = _mm256_set1_epi64x(step);
    const __m256i low_dwords = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (; i + 4 <= nq; i += 4) {
      const __m256i q =
          _mm256_add_epi64(_mm256_set1_epi64x(static_cast<int64_t>(q0 + i)), lanes);
      __m256i c0 = q, c1 = _mm256_srli_epi64(q, 32), c2 = stepv, c3 = _mm256_setzero_si256();
      for (int r = 0; r < philox::kRounds; ++r) {
        const __m256i p0 = _mm256_mul_epu32(c0, m0);
        const __m256i p1 = _mm256_mul_epu32(c2, m1);
        c0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1), rk0[r]);
        c2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3), rk1[r]);
        c1 = p1;
        c3 = p0;
      }
      const __m256i* cs[4] = {&c0, &c1, &c2, &c3};
      for (int r = 0; r < 4; ++r) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(w[r] + i),
                         _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(*cs[r], low_dwords)));
      }
    }
  }
#elif defined(PYENGINE_WORD_VECTORS)
  const WordVec m0 = wv_set1(philox::kM0), m1 = wv_set1(philox::kM1);
  const WordVec w0 = wv_set1(philox::kW0), w1 = wv_set1(philox::kW1);
  for (; i + kWordLanes <= nq; i += kWordLanes) {
    uint32_t lo[kWordLanes], hi[kWordLanes];
    for (int l = 0; l < kWordLanes; ++l) {
      const uint64_t q = q0 + static_cast<uint64_t>(i + l);
      lo[l] = static_cast<uint32_t>(q);
      hi[l] = static_cast<uint32_t>(q >> 32);
    }
    WordVec c0 = wv_load(lo), c1 = wv_load(hi), c2 = wv_set1(step), c3 = wv_set1(0);
    WordVec k0 = wv_set1(key0), k1 = wv_set1(key1);
    for (int r = 0; r < philox::kRounds; ++r) {
      WordVec hi0, lo0, hi1, lo1;
      wv_mulhilo(c0, m0, hi0, lo0);
      wv_mulhilo(c2, m1, hi1, lo1);
      c0 = wv_xor(wv_xor(hi1, c1), k0);
      c2 = wv_xor(wv_xor(hi0, c3), k1);
      c1 = lo1;
      c3 = lo0;
      k0 = wv_add(k0, w0);
      k1 = wv_add(k1, w1);
    }
    wv_store(w[0] + i, c0);
    wv_store(w[1] + i, c1);
    wv_store(w[2] + i, c2);
    wv_store(w[3] + i, c3);
  }
#endif
  for (; i < nq; ++i) {
    const philox::Words ws = philox::quad_words(seed, step, q0 + static_cast<uint64_t>(i));
    for (int r = 0; r < 4; ++r) w[r][i] = ws.w[r];
  }
  (void)key0;
  (void)key1;
}

// The normals of quads [0, nq) from their words: normal.h's float32 Box-Muller on each pair of
// words, one simple loop per pair (the compiler vectorizes it), then interleaved into z.
inline void normals_from_words(float* __restrict z, const uint32_t (*w)[kBlock / 4],
                               int64_t nq) {
  alignas(64) float out[4][kBlock / 4];
  for (int pair = 0; pair < 2; ++pair) {
    const uint32_t* __restrict wr = w[2 * pair];
    const uint32_t* __restrict wt = w[2 * pair + 1];
    float* __restrict zc = out[2 * pair];
    float* __restrict zs = out[2 * pair + 1];
    for (int64_t i = 0; i < nq; ++i) {
      normal::box_muller(philox::uniform24(wr[i]), philox::uniform24(wt[i]), zc[i], zs[i]);
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    z[4 * i + 0] = out[0][i];
    z[4 * i + 1] = out[1][i];
    z[4 * i + 2] = out[2][i];
    z[4 * i + 3] = out[3][i];
  }
}

#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// AVX-512 for the noise, in the AVX2 build only (built with -ffp-contract=off, which these
// functions inherit: the same float32 operations, so the same bits, as every other path).
// Philox in 64-bit lanes: one pmuludq gives a word's whole 64-bit product, its high half one
// shift away, and the three-way xors are one vpternlogd each; the upper halves of the lanes
// carry garbage that no multiply or final word reads. The Box-Muller loop is the one above,
// vectorized 16 lanes wide. Per normal on the Xeon guest: words 1.5 ns with the AVX2 loop,
// 0.45 ns here; words and transform 1.05 ns here (the former float64 log / sincos: ~4 ns).
#define PYENGINE_AVX512_NOISE 1
#define PYENGINE_AVX512_TARGET \
  __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,prefer-vector-width=512")))

PYENGINE_AVX512_TARGET
void philox_words_avx512(uint32_t (*w)[kBlock / 4], uint64_t seed, uint32_t step, uint64_t q0,
                         int64_t nq) {
  __m512i k0[philox::kRounds], k1[philox::kRounds];
  uint32_t key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < philox::kRounds; ++r) {
    k0[r] = _mm512_set1_epi64(key0);
    k1[r] = _mm512_set1_epi64(key1);
    key0 += philox::kW0;
    key1 += philox::kW1;
  }
  const __m512i m0 = _mm512_set1_epi64(philox::kM0), m1 = _mm512_set1_epi64(philox::kM1);
  const __m512i lanes = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  // (the zero-masked forms with a full mask: GCC 12 warns about the undefined pass-through
  // operand of the plain ones)
  const __mmask8 all = 0xFF;
  const __m512i stepv = _mm512_set1_epi64(step);
  int64_t i = 0;
  for (; i + 8 <= nq; i += 8) {
    const __m512i q = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(q0 + i)), lanes);
    __m512i c0 = q, c1 = _mm512_maskz_srli_epi64(all, q, 32), c2 = stepv, c3 = _mm512_setzero_si512();
    for (int r = 0; r < philox::kRounds; ++r) {
      const __m512i p0 = _mm512_maskz_mul_epu32(all, c0, m0);
      const __m512i p1 = _mm512_maskz_mul_epu32(all, c2, m1);
      c0 = _mm512_ternarylogic_epi32(_mm512_maskz_srli_epi64(all, p1, 32), c1, k0[r], 0x96);
      c2 = _mm512_ternarylogic_epi32(_mm512_maskz_srli_epi64(all, p0, 32), c3, k1[r], 0x96);
      c1 = p1;
      c3 = p0;
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[0] + i), _mm512_maskz_cvtepi64_epi32(all, c0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[1] + i), _mm512_maskz_cvtepi64_epi32(all, c1));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[2] + i), _mm512_maskz_cvtepi64_epi32(all, c2));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(w[3] + i), _mm512_maskz_cvtepi64_epi32(all, c3));
  }
  for (; i < nq; ++i) {
    const philox::Words ws = philox::quad_words(seed, step, q0 + static_cast<uint64_t>(i));
    for (int r = 0; r < 4; ++r) w[r][i] = ws.w[r];
  }
}

PYENGINE_AVX512_TARGET
void philox_block_avx512(float* __restrict z, uint64_t seed, uint32_t step, int64_t j,
                         int64_t n) {
  alignas(64) uint32_t w[4][kBlock / 4];
  const int64_t nq = (n + 3) / 4;
  philox_words_avx512(w, seed, step, static_cast<uint64_t>(j / 4), nq);
  normals_from_words(z, w, nq);
}

// PYENGINE_CPU_NO_AVX512=1 in the environment keeps the noise on the AVX2 loops (tests check
// that path on machines that have AVX-512; CPUs without it always take it).
inline bool cpu_has_avx512() {
  static const bool have = [] {
    const char* off = std::getenv("PYENGINE_CPU_NO_AVX512");
    if (off && off[0] && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  }();
  return have;
}
#endif

// The normals of elements j..j+n-1 (j a multiple of 4) of the sample keyed by seed.
inline void philox_block(float* __restrict z, uint64_t seed, uint32_t step, int64_t j,
                         int64_t n) {
#if defined(PYENGINE_AVX512_NOISE)
  if (cpu_has_avx512()) return philox_block_avx512(z, seed, step, j, n);
#endif
  alignas(64) uint32_t w[4][kBlock / 4];
  const int64_t nq = (n + 3) / 4;
  philox_words_soa(w, seed, step, static_cast<uint64_t>(j / 4), nq);
  normals_from_words(z, w, nq);
}

// ---- the update -----------------------------------------------------------------------------

template <class T>
inline const T* at(const void* p, int64_t offset) {
  return static_cast<const T*>(p) + offset;
}

template <class T>
inline T* at_mut(void* p, int64_t offset) {
  return static_cast<T*>(p) + offset;
}

struct Scratch {
  alignas(64) float wide[kBlock];          // a float16 block widened to float32
  alignas(64) unsigned char narrow[kBlock * 8];  // an output block before streaming
  alignas(64) float zf[kBlock];            // Philox normals
};

// Fold buffer block x (n elements) into acc (and aux).
template <class T, class C>
inline void fold(C* acc, C* aux, const T* x, C c, C a, int64_t n, bool first, bool has_aux,
                 Scratch&) {
  if (has_aux) {
    axpy2_block(acc, aux, x, c, a, n, first);
  } else if (first) {
    scale_block(acc, x, c, n);
  } else {
    axpy_block(acc, x, c, n);
  }
}

template <class C>
inline void fold(C* acc, C* aux, const Half* x, C c, C a, int64_t n, bool first, bool has_aux,
                 Scratch& s) {
  if constexpr (!kHardwareHalf) {
    fold<Half, C>(acc, aux, x, c, a, n, first, has_aux, s);
  } else {
    widen_half(s.wide, x, n);
    fold<float, C>(acc, aux, s.wide, c, a, n, first, has_aux, s);
  }
}

// The same for a masked update: base (+)= mc * x too (mc: the mask coefficient b_k).
template <class T, class C>
inline void fold_masked(C* acc, C* aux, C* base, const T* x, C c, C a, C mc, int64_t n,
                        bool first, bool has_aux, Scratch&) {
  if (has_aux) {
    axpy3_block(acc, aux, base, x, c, a, mc, n, first);
  } else {
    axpy2_block(acc, base, x, c, mc, n, first);
  }
}

template <class C>
inline void fold_masked(C* acc, C* aux, C* base, const Half* x, C c, C a, C mc, int64_t n,
                        bool first, bool has_aux, Scratch& s) {
  if constexpr (!kHardwareHalf) {
    fold_masked<Half, C>(acc, aux, base, x, c, a, mc, n, first, has_aux, s);
  } else {
    widen_half(s.wide, x, n);
    fold_masked<float, C>(acc, aux, base, s.wide, c, a, mc, n, first, has_aux, s);
  }
}

template <class T, class C>
inline void emit(T* dst, const C* acc, int64_t n, bool stream, Scratch& s) {
  if (!stream) {
    store_block(dst, acc, n);
    return;
  }
  T* tmp = reinterpret_cast<T*>(s.narrow);
  store_block(tmp, acc, n);
  stream_copy(dst, tmp, n * static_cast<int64_t>(sizeof(T)));
}

template <class C>
inline void emit(Half* dst, const C* acc, int64_t n, bool stream, Scratch& s) {
  if constexpr (!kHardwareHalf) {
    emit<Half, C>(dst, acc, n, stream, s);
  } else {
    const float* f = s.wide;
    if constexpr (sizeof(C) == sizeof(float)) {
      f = acc;
    } else {  // double accumulator: round to float first, as torch's conversion does
      for (int64_t i = 0; i < n; ++i) s.wide[i] = static_cast<float>(acc[i]);
    }
    Half* tmp = stream ? reinterpret_cast<Half*>(s.narrow) : dst;
    narrow_half(tmp, f, n);
    if (stream) stream_copy(dst, tmp, n * static_cast<int64_t>(sizeof(Half)));
  }
}

// ---- the fast path: one dtype, K known at compile time -------------------------------------
//
// When every buffer, out and aux share one storage type (not float16, whose F16C conversions
// live in the block path), z is Philox or absent and there is no mask, each element is
// computed in registers in one loop over all K inputs: one pass instead of K + 1 over L1,
// which took the (16,4,128,128) float32 K=2 update from 840 to ~560 us (15.0 -> 22 GB/s) on
// the EPYC.

// The draw number of sample b: its own when the batch carries per-sample steps.
inline uint32_t step_of(const FusedUpdateArgs& a, int64_t b) {
  return a.steps ? static_cast<uint32_t>(a.steps[b]) : a.step;
}

template <int K, class T, class C, bool AUX, bool NOISE>
inline void fused_loop(T* o, T* ao, const T* const* xs, int64_t j,
                       const C* c, const C* ac, C cz, const float* __restrict z, int64_t n) {
  const T* p[K];
  for (int k = 0; k < K; ++k) p[k] = xs[k] + j;
  // Iteration i reads element i of each input and writes element i of o and ao only, so an
  // output that is one of the inputs creates no dependence between iterations.
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const C v0 = load<C>(p[0][i]);
    C acc = c[0] * v0;
    C aacc = AUX ? ac[0] * v0 : C(0);
#pragma GCC unroll 8
    for (int k = 1; k < K; ++k) {
      const C v = load<C>(p[k][i]);
      acc += c[k] * v;
      if (AUX) aacc += ac[k] * v;
    }
    if (NOISE) acc += cz * static_cast<C>(z[i]);
    o[i] = Store<T>::from(acc);
    if (AUX) ao[i] = Store<T>::from(aacc);
  }
}

template <int K, class T, class C, bool AUX, bool NOISE>
void fast_tile(const FusedUpdateArgs& a, int64_t b, int64_t j0, int64_t j1, bool stream) {
  C c[K], ac[K];
  const T* xs[K];
  for (int k = 0; k < K; ++k) {
    c[k] = static_cast<C>(a.coef_table ? a.coef_table[b * K + k] : a.coef[k]);
    ac[k] = static_cast<C>(a.aux_coef_table ? a.aux_coef_table[b * K + k] : a.aux_coef[k]);
    xs[k] = static_cast<const T*>(a.bufs[k]) + b * a.numel;
  }
  const C cz = static_cast<C>(a.noise_coef_table ? a.noise_coef_table[b] : a.noise_coef);
  const uint64_t seed = NOISE ? a.seeds[b] : 0;
  const uint32_t step = NOISE ? step_of(a, b) : 0;
  T* out = static_cast<T*>(a.out) + b * a.numel;
  T* aux = AUX ? static_cast<T*>(a.aux) + b * a.numel : nullptr;
  alignas(64) T tmp[kBlock];
  alignas(64) T atmp[AUX ? kBlock : 1];
  alignas(64) float zf[NOISE ? kBlock : 1];
  for (int64_t j = j0; j < j1; j += kBlock) {
    const int64_t n = std::min(kBlock, j1 - j);
    if (NOISE) philox_block(zf, seed, step, j, n);
    // streamed outputs go through an L1 block and leave in 16-byte non-temporal stores
    T* o = stream ? tmp : out + j;
    T* ao = AUX ? (stream ? atmp : aux + j) : nullptr;
    fused_loop<K, T, C, AUX, NOISE>(o, ao, xs, j, c, ac, cz, zf, n);
    if (stream) {
      stream_copy(out + j, tmp, n * static_cast<int64_t>(sizeof(T)));
      if (AUX) stream_copy(aux + j, atmp, n * static_cast<int64_t>(sizeof(T)));
    }
  }
  if (stream) stream_fence();
}

using TileFn = void (*)(const FusedUpdateArgs&, int64_t, int64_t, int64_t, bool);

template <int K, class T, class C>
TileFn fast_tile_for(bool aux, bool noise) {
  if (aux) return noise ? fast_tile<K, T, C, true, true> : fast_tile<K, T, C, true, false>;
  return noise ? fast_tile<K, T, C, false, true> : fast_tile<K, T, C, false, false>;
}

template <class T, class C>
TileFn fast_tile_for(int K, bool aux, bool noise) {
  switch (K) {
    case 1: return fast_tile_for<1, T, C>(aux, noise);
    case 2: return fast_tile_for<2, T, C>(aux, noise);
    case 3: return fast_tile_for<3, T, C>(aux, noise);
    case 4: return fast_tile_for<4, T, C>(aux, noise);
    case 5: return fast_tile_for<5, T, C>(aux, noise);
    case 6: return fast_tile_for<6, T, C>(aux, noise);
    case 7: return fast_tile_for<7, T, C>(aux, noise);
    default: return fast_tile_for<8, T, C>(aux, noise);
  }
  static_assert(kKMax == 8, "add the cases above when K_MAX changes");
}

// The fast-path tile function for these arguments, or nullptr for the block path.
inline TileFn fast_tile_fn(const FusedUpdateArgs& a) {
  const int dt = a.out_dtype;
  if (dt == kFloat16 || a.noise_mode == kTensorNoise || a.mask) return nullptr;
  if (a.aux && a.aux_dtype != dt) return nullptr;
  for (int k = 0; k < a.K; ++k) {
    if (a.buf_dtypes[k] != dt) return nullptr;
  }
  const bool aux = a.aux != nullptr, noise = a.noise_mode == kPhiloxNoise;
  if (dt == kFloat64 && a.compute_f64) return fast_tile_for<double, double>(a.K, aux, noise);
  if (a.compute_f64) return nullptr;
  if (dt == kFloat32) return fast_tile_for<float, float>(a.K, aux, noise);
  if (dt == kBFloat16) return fast_tile_for<BFloat16, float>(a.K, aux, noise);
  return nullptr;
}

// Elements [j0, j1) of sample b; j0 is a multiple of 4 (the Philox quads stay whole).
template <class C>
void update_tile(const FusedUpdateArgs& a, int64_t b, int64_t j0, int64_t j1, bool stream) {
  const int K = a.K;
  C c[kKMax], ac[kKMax], bc[kKMax];
  for (int k = 0; k < K; ++k) {
    c[k] = static_cast<C>(a.coef_table ? a.coef_table[b * K + k] : a.coef[k]);
    ac[k] = static_cast<C>(a.aux_coef_table ? a.aux_coef_table[b * K + k] : a.aux_coef[k]);
    bc[k] = static_cast<C>(a.mask_coef_table ? a.mask_coef_table[b * K + k] : a.mask_coef[k]);
  }
  const C cz = static_cast<C>(a.noise_coef_table ? a.noise_coef_table[b] : a.noise_coef);
  const bool has_aux = a.aux != nullptr, has_mask = a.mask != nullptr;
  const uint64_t seed = a.noise_mode == kPhiloxNoise ? a.seeds[b] : 0;
  const uint32_t step = a.noise_mode == kPhiloxNoise ? step_of(a, b) : 0;

  alignas(64) C acc[kBlock];
  alignas(64) C aux[kBlock];
  alignas(64) C zc[kBlock];  // tensor noise, or the mask block
  alignas(64) C base[kBlock];  // sum_k b_k x_k, masked updates only
  Scratch s;
  for (int64_t j = j0; j < j1; j += kBlock) {
    const int64_t n = std::min(kBlock, j1 - j);
    const int64_t off = b * a.numel + j;
    // fold each buffer's block into the accumulators (and base, for a masked update)
    for (int k = 0; k < K; ++k) {
      with_storage_type(a.buf_dtypes[k], [&](auto tag) {
        using T = decltype(tag);
        if (has_mask) {
          fold_masked(acc, aux, base, at<T>(a.bufs[k], off), c[k], ac[k], bc[k], n, k == 0,
                      has_aux, s);
        } else {
          fold(acc, aux, at<T>(a.bufs[k], off), c[k], ac[k], n, k == 0, has_aux, s);
        }
      });
    }
    // add the noise term
    if (a.noise_mode == kPhiloxNoise) {
      philox_block(s.zf, seed, step, j, n);
      for (int64_t i = 0; i < n; ++i) acc[i] += cz * static_cast<C>(s.zf[i]);
    } else if (a.noise_mode == kTensorNoise) {
      with_storage_type(a.noise_dtype, [&](auto tag) {
        using T = decltype(tag);
        load_block(zc, at<T>(a.noise, off), n);
      });
      for (int64_t i = 0; i < n; ++i) acc[i] += cz * zc[i];
    }
    // the inpainting blend, out = m acc + (1 - m) base (a branch per block: the unmasked
    // path is unchanged)
    if (has_mask) {
      load_any_block(zc, a.mask, a.mask_dtype, off, n, s.wide);
      for (int64_t i = 0; i < n; ++i) acc[i] = zc[i] * acc[i] + (C(1) - zc[i]) * base[i];
    }
    // store: every input block was read above, so out/aux may be one of the inputs
    with_storage_type(a.out_dtype, [&](auto tag) {
      using T = decltype(tag);
      emit(at_mut<T>(a.out, off), acc, n, stream, s);
    });
    if (has_aux) {
      with_storage_type(a.aux_dtype, [&](auto tag) {
        using T = decltype(tag);
        emit(at_mut<T>(a.aux, off), aux, n, stream, s);
      });
    }
  }
  if (stream) stream_fence();
}

template <class C>
void update(const FusedUpdateArgs& a, int num_threads) {
  const bool noisy = a.noise_mode == kPhiloxNoise;
  const int64_t tile = noisy ? kTileNoise : kTile;
  const int64_t tiles_per_sample = (a.numel + tile - 1) / tile;
  const int64_t tiles = a.batch * tiles_per_sample;
  const int64_t total = a.batch * a.numel;
  const bool stream = stream_outputs(a);
  const TileFn fast = fast_tile_fn(a);
  auto run = [&](int64_t t) {
    const int64_t b = t / tiles_per_sample;
    const int64_t j0 = (t % tiles_per_sample) * tile;
    const int64_t j1 = std::min(j0 + tile, a.numel);
    if (fast) {
      fast(a, b, j0, j1, stream);
    } else {
      update_tile<C>(a, b, j0, j1, stream);
    }
  };
  if (num_threads > 1 && tiles > 1 &&
      total >= (noisy ? kParallelMinElementsNoise : kParallelMinElements)) {
    pool_for(tiles, num_threads, run, noisy ? 1 : 0);
    return;
  }
  for (int64_t t = 0; t < tiles; ++t) run(t);
}

// The kernel entry (arguments already validated).
inline void fused_update_impl(const FusedUpdateArgs& a, int num_threads) {
  if (a.batch == 0 || a.numel == 0) return;
  if (a.compute_f64) {
    update<double>(a, num_threads);
  } else {
    update<float>(a, num_threads);
  }
}

// float32 normals [batch, numel] of per-sample seeds at draw step: the kernel's noise alone.
inline void philox_normal_impl(float* out, const uint64_t* seeds, int64_t batch, int64_t numel,
                               uint32_t step) {
  alignas(64) float zf[kBlock];
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j = 0; j < numel; j += kBlock) {
      const int64_t n = std::min(kBlock, numel - j);
      philox_block(zf, seeds[b], step, j, n);
      std::copy(zf, zf + n, out + b * numel + j);
    }
  }
}

// The raw words of quads q0..q0+nq-1 as the kernel makes them: out[4 i + r] = word r.
inline void philox_words_impl(uint32_t* out, uint64_t seed, uint32_t step, uint64_t q0,
                              int64_t nq) {
  constexpr int64_t kQ = kBlock / 4;
  alignas(64) uint32_t w[4][kQ];
  for (int64_t i0 = 0; i0 < nq; i0 += kQ) {
    const int64_t m = std::min(kQ, nq - i0);
    philox_words_soa(w, seed, step, q0 + static_cast<uint64_t>(i0), m);
    for (int64_t i = 0; i < m; ++i) {
      for (int r = 0; r < 4; ++r) out[4 * (i0 + i) + r] = w[r][i];
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace pyengine
