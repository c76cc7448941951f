// The normal transform of the Philox noise (DESIGN.md s.6): two float32 uniforms -> two normals,
// by Box-Muller with log, cos and sin evaluated as one fixed sequence of float32 operations.
//
// pyengine/noise.py (`box_muller`) is the definition; the C++ CPU kernel, the CUDA kernel
// (both through this header), the numba and the Triton kernels perform the same operations in
// the same order, so every backend produces the same bits. Only IEEE-exact operations are
// used: +, -, * (each rounded to float32: the kernels are built without FMA contraction,
// -ffp-contract=off / --fmad=false), a correctly rounded sqrt, exact int <-> float conversions
// and bit manipulation. No libm call (their last-bit rounding differs between libraries).
//
// For uniforms u (radius) and v (angle) in (0, 1]:
//
//   log u:  u = 2^e m, m in [sqrt(1/2), sqrt(2)) by integer operations on the bits of u
//           (e = (bits(u) - 0x3F3504F3) >> 23 arithmetic, bits(m) = low 23 bits of that
//           + 0x3F3504F3); f = m - 1 (exact);
//           log u = e * LN2_HI + (e * LN2_LO + (f + (f * f) * P(f)))
//           with P of degree 8 by Horner (from kLog8), e * LN2_HI exact.
//   r = sqrt(-2 log u)
//   angle:  n = int(v * 4 + 0.5) (truncation; 0..4), y = v - n * 0.25 (exact, |y| <= 1/8 turn)
//           s = y * S(y*y), S of degree 3 in y*y by Horner  ~ sin(2 pi y)
//           c = 1 + (y*y) * C(y*y), C of degree 3             ~ cos(2 pi y)
//           cos(2 pi v), sin(2 pi v) = the quadrant n mod 4 of (c, s): n odd swaps them,
//           cos is negated for n mod 4 in {1, 2}, sin for n mod 4 in {2, 3} (sign-bit flips)
//   z0 = r * cos(2 pi v), z1 = r * sin(2 pi v)
//
// Accuracy, over all 2^24 float32 uniforms of each kind against float64 log, sqrt, cos, sin
// of the same uniforms: r within 3.6e-7 (1 ulp; 9.9e-8 relative), cos and sin within 8.8e-8,
// so |z - z_float64| <= 3.6e-7 + 5.8 * 8.8e-8 + ulp(5.8) / 2 < 1.2e-6 (|z| < 5.8; the former
// libm-based transform: 9.5e-7). tests/test_noise.py and csrc/tests check it.
#pragma once

#include <cstdint>
#if !defined(__CUDACC__)
#include <cmath>
#include <cstring>
#endif

#if defined(__CUDACC__)
#define PE_NORMAL_FN static __host__ __device__ __forceinline__
#else
#define PE_NORMAL_FN static inline
#endif

namespace pyengine {
namespace normal {

// P(f) ~ (log(1 + f) - f) / f^2 on [sqrt(1/2) - 1, sqrt(2) - 1] = kLog0 + kLog1 f + .. kLog8 f^8
constexpr float kLog0 = -0x1.fffff8p-2f, kLog1 = 0x1.55555p-2f, kLog2 = -0x1.000426p-2f,
                kLog3 = 0x1.99a3f6p-3f, kLog4 = -0x1.542766p-3f, kLog5 = 0x1.22715ep-3f,
                kLog6 = -0x1.0f3756p-3f, kLog7 = 0x1.0849bep-3f, kLog8 = -0x1.38339ap-4f;
constexpr float kLn2Hi = 0x1.62e4p-1f;     // 8 significant bits: e * kLn2Hi is exact
constexpr float kLn2Lo = 0x1.7f7d1cp-20f;  // log 2 - kLn2Hi
// sin(2 pi y) / y and (cos(2 pi y) - 1) / y^2 as polynomials in y^2, |y| <= 1/8
constexpr float kSin0 = 0x1.921fb6p+2f, kSin1 = -0x1.4abbbap+5f, kSin2 = 0x1.465e92p+6f,
                kSin3 = -0x1.2d931p+6f;
constexpr float kCos0 = -0x1.3bd3ccp+4f, kCos1 = 0x1.03c1dep+6f, kCos2 = -0x1.55c5ep+6f,
                kCos3 = 0x1.d9d57ep+5f;

PE_NORMAL_FN uint32_t bits_of(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
#endif
}

PE_NORMAL_FN float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof x);
  return x;
#endif
}

PE_NORMAL_FN float sqrt_rn(float x) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(x);
#else
  return std::sqrt(x);
#endif
}

// log u for a float32 u in (0, 1] (the sequence above).
PE_NORMAL_FN float log_unit(float u) {
  const int32_t ix = static_cast<int32_t>(bits_of(u) - 0x3F3504F3u);
  const int32_t e = ix >> 23;  // arithmetic: u < sqrt(1/2) gives e < 0
  const float m = float_of((static_cast<uint32_t>(ix) & 0x007FFFFFu) + 0x3F3504F3u);
  const float f = m - 1.0f;
  float p = kLog8 * f + kLog7;
  p = p * f + kLog6;
  p = p * f + kLog5;
  p = p * f + kLog4;
  p = p * f + kLog3;
  p = p * f + kLog2;
  p = p * f + kLog1;
  p = p * f + kLog0;
  const float ef = static_cast<float>(e);
  return ef * kLn2Hi + (ef * kLn2Lo + (f + (f * f) * p));
}

// (cos 2 pi v, sin 2 pi v) for a float32 v in (0, 1] (the sequence above).
PE_NORMAL_FN void sincos_turn(float v, float& c_out, float& s_out) {
  const int32_t n = static_cast<int32_t>(v * 4.0f + 0.5f);
  const float y = v - static_cast<float>(n) * 0.25f;
  const float y2 = y * y;
  const float s = y * (((kSin3 * y2 + kSin2) * y2 + kSin1) * y2 + kSin0);
  const float c = 1.0f + y2 * (((kCos3 * y2 + kCos2) * y2 + kCos1) * y2 + kCos0);
  const uint32_t q = static_cast<uint32_t>(n);
  const uint32_t swap = 0u - (q & 1u);
  const uint32_t sb = bits_of(s), cb = bits_of(c);
  c_out = float_of(((sb & swap) | (cb & ~swap)) ^ (((q + 1u) & 2u) << 30));
  s_out = float_of(((cb & swap) | (sb & ~swap)) ^ ((q & 2u) << 30));
}

// The two normals of the uniforms (u, v): z0 = r cos(2 pi v), z1 = r sin(2 pi v).
PE_NORMAL_FN void box_muller(float u, float v, float& z0, float& z1) {
  const float r = sqrt_rn(-2.0f * log_unit(u));
  float c, s;
  sincos_turn(v, c, s);
  z0 = r * c;
  z1 = r * s;
}

}  // namespace normal
}  // namespace pyengine
