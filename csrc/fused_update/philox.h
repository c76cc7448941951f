// Philox-4x32-10 counter-based noise and its Box-Muller normals (DESIGN.md s.6).
//
// Torch-free, header-only, compiled for the host (C++ CPU kernel) and the device (CUDA
// kernel). It reproduces pyengine/noise.py bit for bit on the uint32 level:
//
//   key     (k0, k1)         = (seed & 0xffffffff, seed >> 32)      per-sample uint64 seed
//   counter (c0, c1, c2, c3) = (q & 0xffffffff, q >> 32, step, 0)   q = element_index / 4
//   u_k = float32(float32(w_k >> 8) + 0.5f) * 2^-24                 in (0, 1]
//   z[4q..4q+1] = (r cos 2 pi u1, r sin 2 pi u1) with r = sqrt(-2 log u0), and the same with
//   (u2, u3) for z[4q+2..4q+3]: normal.h's float32 Box-Muller, the same bits everywhere.
#pragma once

#include <cmath>
#include <cstdint>

#include "normal.h"

// static: the CPU kernel is compiled once per instruction set and each copy keeps its own.
#if defined(__CUDACC__)
#define PE_HOST_DEVICE static __host__ __device__ __forceinline__
#else
#define PE_HOST_DEVICE static inline
#endif

namespace pyengine {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;  // multiplier of words 0 and 1
constexpr uint32_t kM1 = 0xCD9E8D57u;  // multiplier of words 2 and 3
constexpr uint32_t kW0 = 0x9E3779B9u;  // Weyl key increments (golden ratio, sqrt(3) - 1)
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

struct Words {
  uint32_t w[4];
};

PE_HOST_DEVICE uint32_t mul_hi(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Ten rounds of Philox-4x32 (Salmon et al. 2011): the key is bumped between rounds.
PE_HOST_DEVICE Words philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                   uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    if (r) {
      k0 += kW0;
      k1 += kW1;
    }
    const uint32_t hi0 = mul_hi(kM0, c0), lo0 = kM0 * c0;
    const uint32_t hi1 = mul_hi(kM1, c2), lo1 = kM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Words{{c0, c1, c2, c3}};
}

// The four words of quad q (elements 4q..4q+3) of the sample keyed by seed, at draw step.
PE_HOST_DEVICE Words quad_words(uint64_t seed, uint32_t step, uint64_t q) {
  return philox4x32_10(static_cast<uint32_t>(q), static_cast<uint32_t>(q >> 32), step, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// u in (0, 1): the 24 high bits plus one half, in float32 exactly as the torch reference
// rounds it (the + 0.5f rounds to even once w >> 8 >= 2^23).
PE_HOST_DEVICE float uniform24(uint32_t w) {
  const float hi = static_cast<float>(w >> 8);
  const float shifted = hi + 0.5f;
  return shifted * 5.9604644775390625e-08f;  // 2^-24, exact
}

// Box-Muller on the quad's four words: z[0..3] for elements 4q..4q+3.
PE_HOST_DEVICE void box_muller4(const Words& w, float z[4]) {
  normal::box_muller(uniform24(w.w[0]), uniform24(w.w[1]), z[0], z[1]);
  normal::box_muller(uniform24(w.w[2]), uniform24(w.w[3]), z[2], z[3]);
}

}  // namespace philox
}  // namespace pyengine
