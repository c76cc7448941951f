// Storage dtypes of the fused update and their host conversions to and from float.
//
// Torch-free. The codes are the ones pyengine/backends/_native.py passes through the bindings.
// float16 and bfloat16 are carried as raw uint16 bits; the conversions round to nearest even
// like torch's, and are written with selects instead of branches so the compiler vectorizes
// the block loops of the CPU kernel that call them. They are `static`: the CPU kernel is
// compiled once per instruction set (fused_update_cpu*.cpp) and each copy must keep its own.
#pragma once

#include <cstdint>
#include <cstring>

namespace pyengine {

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
constexpr int kNumDTypes = 4;

inline bool valid_dtype(int code) { return code >= 0 && code < kNumDTypes; }

inline int dtype_size(int code) {
  return code == kFloat64 ? 8 : code == kFloat32 ? 4 : 2;
}

inline const char* dtype_name(int code) {
  switch (code) {
    case kFloat32: return "float32";
    case kFloat64: return "float64";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unknown";
  }
}

struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

static inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

static inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// cond ? a : b as bit masks: GCC does not if-convert every ?: in these loops, and a branch in
// the loop body stops the vectorizer (float16 blocks ran 5x slower with ?:).
static inline uint32_t select(bool cond, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - static_cast<uint32_t>(cond);
  return (a & m) | (b & ~m);
}

// bfloat16 is the high half of a float32.
static inline float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

static inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // nearest, ties to even
  // NaN becomes torch's canonical quiet NaN
  return static_cast<uint16_t>(select((u & 0x7FFFFFFFu) > 0x7F800000u, 0x7FC0u, rounded));
}

// IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits.
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = h & 0x7FFFu;
  // normal numbers: move exponent and mantissa into place and rebias 15 -> 127
  const uint32_t normal = (em << 13) + ((127u - 15u) << 23);
  // infinity and NaN: the exponent field saturates at 255 instead
  const uint32_t special = normal + ((128u - 16u) << 23);
  // zero and subnormals: mantissa * 2^-24, exact in float32
  const uint32_t sub = float_bits(static_cast<float>(static_cast<int32_t>(em)) *
                                  5.9604644775390625e-08f);
  const uint32_t mag = select(em < 0x0400u, sub, select(em >= 0x7C00u, special, normal));
  return bits_float(sign | mag);
}

static inline uint16_t float_to_half(float f) {
  const uint32_t u = float_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // normal halves: rebias 127 -> 15 and round the 13 dropped bits to nearest even
  const uint32_t normal = (a - ((127u - 15u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // subnormal halves (|f| < 2^-14): adding 0.5 puts the 2^-24 unit in the float's last bit,
  // so the float adder does the rounding
  const uint32_t sub = float_bits(bits_float(a) + 0.5f) - 0x3F000000u;
  uint32_t mag = select(a < 0x38800000u, sub, normal);
  mag = select(a >= 0x477FF000u, 0x7C00u, mag);  // >= 65520 rounds to infinity
  mag = select(a > 0x7F800000u, 0x7E00u, mag);   // NaN
  return static_cast<uint16_t>(sign | mag);
}

}  // namespace pyengine
