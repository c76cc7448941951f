// C++ unit tests of the CPU fused update, built with AddressSanitizer and
// UndefinedBehaviorSanitizer by tests/test_native_sanitizers.py (no torch, no Python).
//
//   * Philox-4x32-10: Random123's known answers; the vectorized words equal the scalar ones
//   * Box-Muller: the kernel's (vectorized) normals bit for bit the scalar normal.h sequence of
//     philox.h, and within the stated 1.2e-6 of float64 libm log / sqrt / cos / sin
//   * float16 / bfloat16 conversions against plain double-arithmetic references, every bit
//     pattern and every tie
//   * the kernel against a naive float64 loop: every storage dtype, mixed dtypes, K = 1..8,
//     per-step and per-sample coefficients, every noise mode, per-sample draw numbers, the
//     inpainting mask in every dtype, aux, in-place aliasing, sizes around the block and
//     tile, 1 and 2 threads, each instruction-set build
//   * the worker pool: 2-thread updates from several threads at once equal 1-thread ones
//   * the launcher's validation
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "fused_update/dtypes.h"
#include "fused_update/fused_update.h"
#include "fused_update/launcher.h"
#include "fused_update/philox.h"

using namespace pyengine;

namespace {

int failures = 0;
int checks = 0;

#define CHECK(cond, ...)                                         \
  do {                                                           \
    ++checks;                                                    \
    if (!(cond)) {                                               \
      if (++failures <= 20) {                                    \
        std::fprintf(stderr, "%s:%d: CHECK(%s) failed: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                       \
        std::fprintf(stderr, "\n");                              \
      }                                                          \
    }                                                            \
  } while (0)

// ---- Philox --------------------------------------------------------------------------------

void test_philox_known_answers() {
  struct Kat {
    uint32_t c[4], k[2], w[4];
  };
  const uint32_t M = 0xFFFFFFFFu;
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8}},
      {{M, M, M, M}, {M, M}, {0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD}},
      {{0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344},
       {0xA4093822, 0x299F31D0},
       {0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1}},
  };
  for (const Kat& t : kats) {
    const philox::Words w = philox::philox4x32_10(t.c[0], t.c[1], t.c[2], t.c[3], t.k[0], t.k[1]);
    for (int r = 0; r < 4; ++r) CHECK(w.w[r] == t.w[r], "word %d: %08x != %08x", r, w.w[r], t.w[r]);
  }
}

// The words the kernel makes (vectorized, both builds) equal the scalar header's.
void test_philox_words_vectorized(const std::string& isa) {
  std::mt19937_64 rng(42);
  for (int trial = 0; trial < 40; ++trial) {
    const uint64_t seed = rng();
    const uint32_t step = static_cast<uint32_t>(rng());
    const uint64_t q0 = trial % 3 == 0 ? (uint64_t(1) << 32) - 5 : rng() >> (trial % 40);
    const int64_t nq = 1 + static_cast<int64_t>(rng() % 200);
    std::vector<uint32_t> got(static_cast<size_t>(4 * nq));
    philox_words_cpu(got.data(), seed, step, q0, nq);
    for (int64_t i = 0; i < nq; ++i) {
      const philox::Words w = philox::quad_words(seed, step, q0 + static_cast<uint64_t>(i));
      for (int r = 0; r < 4; ++r) {
        CHECK(got[static_cast<size_t>(4 * i + r)] == w.w[r], "%s quad %lld word %d", isa.c_str(),
              static_cast<long long>(i), r);
      }
    }
  }
}

// The kernel's (vectorized) normals bit for bit the scalar sequence of normal.h, and within
// 1.2e-6 of the float64 Box-Muller of the same uniforms.
void test_normals(const std::string& isa) {
  const int64_t batch = 3, numel = 5000;
  const uint64_t seeds[batch] = {0, 0xFFFFFFFFFFFFFFFFull, 0x0000000700000005ull};
  std::vector<float> z(static_cast<size_t>(batch * numel));
  philox_normal_cpu(z.data(), seeds, batch, numel, 77);
  double worst = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t q = 0; q < (numel + 3) / 4; ++q) {
      const philox::Words w = philox::quad_words(seeds[b], 77, static_cast<uint64_t>(q));
      float want[4];
      philox::box_muller4(w, want);
      for (int r = 0; r < 4 && 4 * q + r < numel; ++r) {
        const float got = z[static_cast<size_t>(b * numel + 4 * q + r)];
        uint32_t gb, wb;
        std::memcpy(&gb, &got, 4);
        std::memcpy(&wb, &want[r], 4);
        CHECK(gb == wb, "%s normal %lld: %.9g vs %.9g", isa.c_str(),
              static_cast<long long>(4 * q + r), got, want[r]);
        // the float64 Box-Muller of the same float32 uniforms
        const double u = philox::uniform24(w.w[r & 2]), v = philox::uniform24(w.w[(r & 2) + 1]);
        const double rad = std::sqrt(-2.0 * std::log(u));
        const double th = 6.283185307179586476925 * v;
        const double ref = rad * ((r & 1) ? std::sin(th) : std::cos(th));
        worst = std::max(worst, std::fabs(static_cast<double>(got) - ref));
      }
    }
  }
  CHECK(worst <= 1.2e-6, "%s normals %.3g from float64 Box-Muller", isa.c_str(), worst);
  CHECK(worst > 0.0, "%s normals equal to float64 Box-Muller everywhere?", isa.c_str());
}

// The transform over every float32 uniform it can see, against float64 libm: radius within
// 3.6e-7 (1 ulp), cos and sin within 8.8e-8 (normal.h's stated accuracy).
void test_normal_transform_exhaustive() {
  double worst_r = 0.0, worst_cs = 0.0;
  for (uint32_t a = 0; a < (1u << 24); a += 7) {  // 2.4M of the 2^24 uniforms
    const float u = philox::uniform24(a << 8);
    const float r = std::sqrt(-2.0f * normal::log_unit(u));
    const double rr = std::sqrt(-2.0 * std::log(static_cast<double>(u)));
    worst_r = std::max(worst_r, std::fabs(r - rr));
    float c, s;
    normal::sincos_turn(u, c, s);
    const double th = 6.283185307179586476925 * u;
    worst_cs = std::max(worst_cs, std::max(std::fabs(c - std::cos(th)), std::fabs(s - std::sin(th))));
  }
  CHECK(worst_r <= 3.6e-7, "radius %.3g from float64", worst_r);
  CHECK(worst_cs <= 8.8e-8, "cos/sin %.3g from float64", worst_cs);
}

// ---- float16 / bfloat16 --------------------------------------------------------------------

// Round-to-nearest-even of a finite double to a binary format with `mant` stored mantissa
// bits, exponent range [emin, emax]: the plain reference the bit tricks are checked against.
double round_to_format(double x, int mant, int emin, int emax) {
  if (x == 0.0 || !std::isfinite(x)) return x;
  const double ax = std::fabs(x);
  int e = std::ilogb(ax);
  if (e < emin) e = emin;                       // subnormals share the smallest exponent
  const double quantum = std::ldexp(1.0, e - mant);
  double r = std::nearbyint(ax / quantum) * quantum;  // default mode: ties to even
  const double max_finite = std::ldexp(2.0 - std::ldexp(1.0, -mant), emax);
  if (r > max_finite) r = INFINITY;
  return std::copysign(r, x);
}

void test_half_conversions() {
  // every float16 bit pattern to float: the value (sign, exponent, mantissa) directly
  for (uint32_t h = 0; h < 65536; ++h) {
    const int sign = h >> 15, ex = (h >> 10) & 31, man = h & 1023;
    const float got = half_to_float(static_cast<uint16_t>(h));
    if (ex == 31) {
      CHECK(man ? std::isnan(got) : std::isinf(got), "half %04x", h);
      continue;
    }
    const double v = ex ? std::ldexp(1.0 + man / 1024.0, ex - 15) : std::ldexp(man / 1024.0, -14);
    CHECK(static_cast<double>(got) == (sign ? -v : v), "half %04x -> %g", h, got);
    CHECK(std::signbit(got) == (sign != 0), "half %04x sign", h);
    // and back, exactly
    CHECK(float_to_half(got) == h, "half %04x round trip", h);
  }
  // every tie and neighbour between consecutive finite halves, and random floats
  std::mt19937 rng(7);
  std::vector<float> xs;
  for (uint32_t h = 0; h < 0x7BFF; ++h) {
    const double a = half_to_float(static_cast<uint16_t>(h));
    const double b = half_to_float(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((a + b) / 2);  // exact
    xs.push_back(mid);
    xs.push_back(std::nextafter(mid, 0.0f));
    xs.push_back(std::nextafter(mid, INFINITY));
  }
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = rng();
    float f;
    std::memcpy(&f, &u, sizeof f);
    if (!std::isnan(f)) xs.push_back(f);
  }
  xs.push_back(65519.99f);
  xs.push_back(65520.0f);
  xs.push_back(INFINITY);
  for (float x : {1.0f, -1.0f}) {
    for (float f : std::vector<float>(xs)) xs.push_back(x * f);
  }
  for (float f : xs) {
    const double want = round_to_format(f, 10, -14, 15);
    const float got = half_to_float(float_to_half(f));
    CHECK(static_cast<double>(got) == want && std::signbit(got) == std::signbit(want),
          "float %.9g -> half %.9g, want %.9g", f, got, want);
    const double wb = round_to_format(f, 7, -126, 127);
    const float gb = bf16_to_float(float_to_bf16(f));
    CHECK(static_cast<double>(gb) == wb, "float %.9g -> bf16 %.9g, want %.9g", f, gb, wb);
  }
  const float nan = std::nanf("");
  CHECK(std::isnan(half_to_float(float_to_half(nan))), "half nan");
  CHECK(std::isnan(bf16_to_float(float_to_bf16(nan))), "bf16 nan");
  CHECK(float_to_bf16(nan) == 0x7FC0, "bf16 canonical nan");
}

// ---- the kernel against a naive float64 loop -----------------------------------------------

struct Array {
  int dtype;
  std::vector<unsigned char> bytes;
  Array(int dt, size_t n) : dtype(dt), bytes(n * static_cast<size_t>(dtype_size(dt))) {}
  void set(size_t i, double v) {
    switch (dtype) {
      case kFloat32: reinterpret_cast<float*>(bytes.data())[i] = static_cast<float>(v); break;
      case kFloat64: reinterpret_cast<double*>(bytes.data())[i] = v; break;
      case kFloat16:
        reinterpret_cast<uint16_t*>(bytes.data())[i] = float_to_half(static_cast<float>(v));
        break;
      default:
        reinterpret_cast<uint16_t*>(bytes.data())[i] = float_to_bf16(static_cast<float>(v));
    }
  }
  double get(size_t i) const {
    switch (dtype) {
      case kFloat32: return reinterpret_cast<const float*>(bytes.data())[i];
      case kFloat64: return reinterpret_cast<const double*>(bytes.data())[i];
      case kFloat16: return half_to_float(reinterpret_cast<const uint16_t*>(bytes.data())[i]);
      default: return bf16_to_float(reinterpret_cast<const uint16_t*>(bytes.data())[i]);
    }
  }
  void* data() { return bytes.data(); }
};

double unit_roundoff(int dtype) {
  switch (dtype) {
    case kFloat64: return std::ldexp(1.0, -53);
    case kFloat32: return std::ldexp(1.0, -24);
    case kFloat16: return std::ldexp(1.0, -11);
    default: return std::ldexp(1.0, -8);
  }
}

struct Case {
  int64_t batch, numel;
  int K;
  int buf_dtype;  // -1: mixed
  int out_dtype;
  bool per_sample, aux, compute_f64;
  int noise_mode;
  bool per_sample_noise;
  int alias;  // -1: none, else out is bufs[alias]
  int threads;
  bool per_sample_step;
  int mask_dtype;  // -1: no mask
};

void run_case(const Case& c, std::mt19937_64& rng, const std::string& isa) {
  std::normal_distribution<double> normal;
  const size_t n = static_cast<size_t>(c.batch * c.numel);
  std::vector<Array> bufs;
  for (int k = 0; k < c.K; ++k) {
    const int dt = c.buf_dtype >= 0 ? c.buf_dtype : k % kNumDTypes;
    bufs.emplace_back(c.alias == k ? c.out_dtype : dt, n);
    for (size_t i = 0; i < n; ++i) bufs.back().set(i, normal(rng));
  }
  std::vector<double> in(static_cast<size_t>(c.K) * n);  // the stored inputs, as doubles
  for (int k = 0; k < c.K; ++k) {
    for (size_t i = 0; i < n; ++i) {
      in[static_cast<size_t>(k) * n + i] = bufs[static_cast<size_t>(k)].get(i);
    }
  }
  std::vector<double> coef(static_cast<size_t>(c.batch * c.K)), acoef(coef.size());
  for (auto& v : coef) v = normal(rng);
  for (auto& v : acoef) v = normal(rng);
  std::vector<double> nc(static_cast<size_t>(c.batch));
  for (auto& v : nc) v = std::fabs(normal(rng));
  std::vector<uint64_t> seeds(static_cast<size_t>(c.batch));
  for (auto& s : seeds) s = rng();
  const uint32_t step = static_cast<uint32_t>(rng());
  std::vector<int64_t> steps(static_cast<size_t>(c.batch));
  for (auto& s : steps) s = static_cast<int64_t>(rng());  // the kernel takes the low 32 bits
  Array noise(kFloat32, n);
  for (size_t i = 0; i < n; ++i) noise.set(i, normal(rng));
  // the mask: uniform in [0, 1] or binary, in its own dtype; base coefficients
  Array mask(c.mask_dtype >= 0 ? c.mask_dtype : kFloat32, c.mask_dtype >= 0 ? n : 0);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  const bool binary = rng() % 2 == 0;
  for (size_t i = 0; i < mask.bytes.size() / static_cast<size_t>(dtype_size(mask.dtype)); ++i) {
    mask.set(i, binary ? static_cast<double>(rng() % 2) : unif(rng));
  }
  std::vector<double> mcoef(coef.size());
  for (auto& v : mcoef) v = normal(rng);

  FusedUpdateArgs a;
  Array out(c.out_dtype, c.alias >= 0 ? 0 : n), aux(c.out_dtype, c.aux ? n : 0);
  a.out = c.alias >= 0 ? bufs[static_cast<size_t>(c.alias)].data() : out.data();
  a.out_dtype = c.out_dtype;
  a.aux = c.aux ? aux.data() : nullptr;
  a.aux_dtype = c.out_dtype;
  a.K = c.K;
  for (int k = 0; k < c.K; ++k) {
    a.bufs[k] = bufs[static_cast<size_t>(k)].data();
    a.buf_dtypes[k] = bufs[static_cast<size_t>(k)].dtype;
    a.coef[k] = coef[static_cast<size_t>(k)];
    a.aux_coef[k] = acoef[static_cast<size_t>(k)];
    a.mask_coef[k] = mcoef[static_cast<size_t>(k)];
  }
  a.batch = c.batch;
  a.numel = c.numel;
  a.coef_table = c.per_sample ? coef.data() : nullptr;
  a.aux_coef_table = c.per_sample ? acoef.data() : nullptr;
  a.noise_mode = c.noise_mode;
  a.noise_coef = nc[0];
  a.noise_coef_table = c.per_sample_noise ? nc.data() : nullptr;
  a.seeds = seeds.data();
  a.step = step;
  a.noise = noise.data();
  a.noise_dtype = kFloat32;
  a.steps = c.per_sample_step ? steps.data() : nullptr;
  a.mask = c.mask_dtype >= 0 ? mask.data() : nullptr;
  a.mask_dtype = mask.dtype;
  a.mask_coef_table = c.per_sample ? mcoef.data() : nullptr;
  a.compute_f64 = c.compute_f64;
  fused_update_cpu(a, c.threads);

  // the naive loop: every term in float64, the Philox normals from the scalar header
  const Array& o = c.alias >= 0 ? bufs[static_cast<size_t>(c.alias)] : out;
  const double u_c = c.compute_f64 ? std::ldexp(1.0, -53) : std::ldexp(1.0, -24);
  const double u_o = unit_roundoff(c.out_dtype);
  for (int64_t b = 0; b < c.batch; ++b) {
    for (int64_t j = 0; j < c.numel; ++j) {
      const size_t i = static_cast<size_t>(b * c.numel + j);
      double want = 0.0, awant = 0.0, bwant = 0.0, size = 0.0, asize = 0.0, bsize = 0.0;
      double extra = 0.0;
      for (int k = 0; k < c.K; ++k) {
        const size_t ck = static_cast<size_t>(c.per_sample ? b * c.K + k : k);
        const double x = in[static_cast<size_t>(k) * n + i];
        want += coef[ck] * x;
        awant += acoef[ck] * x;
        bwant += mcoef[ck] * x;
        size += std::fabs(coef[ck] * x);
        asize += std::fabs(acoef[ck] * x);
        bsize += std::fabs(mcoef[ck] * x);
      }
      if (c.noise_mode != kNoNoise) {
        double z = noise.get(i);
        if (c.noise_mode == kPhiloxNoise) {
          float q[4];
          const uint32_t st =
              c.per_sample_step ? static_cast<uint32_t>(steps[static_cast<size_t>(b)]) : step;
          philox::box_muller4(philox::quad_words(seeds[static_cast<size_t>(b)], st,
                                                 static_cast<uint64_t>(j / 4)), q);
          z = q[j % 4];
        }
        const double czv = c.per_sample_noise ? nc[static_cast<size_t>(b)] : nc[0];
        want += czv * z;
        size += std::fabs(czv * z);
        // the kernel's normals may differ from libm's recipe by 4 float32 ulp (|z| < 6)
        if (c.noise_mode == kPhiloxNoise) extra = czv * 4.0 * std::ldexp(1.0, -21);
      }
      // the blend m res + (1 - m) base: three more roundings, of terms at most as large
      if (c.mask_dtype >= 0) {
        const double m = mask.get(i);
        want = m * want + (1.0 - m) * bwant;
        size = size + bsize + std::fabs(want);
        extra *= m;
      }
      // K + 2 (+ 3) roundings in the compute type, one of the result to the output type (down
      // to half of float16's smallest subnormal)
      const double sub = c.out_dtype == kFloat16 ? std::ldexp(1.0, -25) : 0.0;
      const double tol = (c.K + 5) * u_c * size + u_o * std::fabs(want) + sub + extra;
      CHECK(std::fabs(o.get(i) - want) <= tol, "%s out[%lld] %.17g want %.17g (K=%d dtype %d)",
            isa.c_str(), static_cast<long long>(i), o.get(i), want, c.K, c.out_dtype);
      if (c.aux) {
        const double atol = (c.K + 2) * u_c * asize + u_o * std::fabs(awant) + sub;
        CHECK(std::fabs(aux.get(i) - awant) <= atol, "%s aux[%lld]", isa.c_str(),
              static_cast<long long>(i));
      }
    }
  }
}

void test_kernel(const std::string& isa) {
  std::mt19937_64 rng(1234);
  const int64_t sizes[][2] = {{1, 1}, {1, 7}, {3, 131}, {2, 256}, {2, 257}, {1, 1031},
                              {2, 33000}};
  int n = 0;
  for (const auto& sz : sizes) {
    for (int K = 1; K <= kKMax; ++K) {
      for (int dt = -1; dt < kNumDTypes; ++dt) {
        Case c{};
        c.batch = sz[0];
        c.numel = sz[1];
        c.K = K;
        c.buf_dtype = dt;
        c.out_dtype = dt >= 0 ? dt : static_cast<int>(rng() % kNumDTypes);
        c.compute_f64 = c.out_dtype == kFloat64 || rng() % 4 == 0;
        c.per_sample = (n & 1) != 0;
        c.aux = (n & 2) != 0;
        c.noise_mode = static_cast<int>(n % 3);
        c.per_sample_noise = (n & 4) != 0;
        c.alias = (n % 5 == 0 && dt >= 0) ? static_cast<int>(rng() % K) : -1;
        c.threads = (n & 8) ? 2 : 1;
        c.per_sample_step = (n & 16) != 0;
        c.mask_dtype = (n / 3) % 2 ? static_cast<int>(rng() % kNumDTypes) : -1;
        // the larger sizes only for a few K, to keep the sanitized run short
        if (sz[1] > 2000 && K % 3 != 1) continue;
        run_case(c, rng, isa);
        ++n;
      }
    }
  }
}

// ---- the worker pool ----------------------------------------------------------------------

// Updates large enough to run on the pool (2 threads), issued from four threads at once: one
// caller gets the pool, the others work alone; every result is bitwise the 1-thread result,
// with and without noise, over many rounds (a worker that joins late, or not at all, leaves
// nothing undone).
void test_pool_concurrent_callers(const std::string& isa) {
  const int64_t batch = 3, numel = 150001;  // 450K elements: above both parallel thresholds
  std::vector<float> x(static_cast<size_t>(batch * numel)), y(x.size());
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd;
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = nd(rng);
    y[i] = nd(rng);
  }
  const uint64_t seeds[batch] = {1, 2, 0xFFFFFFFFFFFFFFFFull};
  auto args_for = [&](float* out, bool noisy) {
    FusedUpdateArgs a;
    a.out = out;
    a.K = 2;
    a.bufs[0] = x.data();
    a.bufs[1] = y.data();
    a.batch = batch;
    a.numel = numel;
    a.coef[0] = 0.75;
    a.coef[1] = -0.5;
    if (noisy) {
      a.noise_mode = kPhiloxNoise;
      a.noise_coef = 0.25;
      a.seeds = seeds;
      a.step = 9;
    }
    return a;
  };
  std::vector<float> want[2];
  for (int noisy = 0; noisy < 2; ++noisy) {
    want[noisy].resize(x.size());
    fused_update_cpu(args_for(want[noisy].data(), noisy != 0), 1);
  }
  constexpr int kCallers = 4, kRounds = 12;
  std::vector<std::vector<float>> outs(kCallers, std::vector<float>(x.size()));
  std::vector<int> bad(kCallers, 0);
  std::vector<std::thread> callers;
  for (int t = 0; t < kCallers; ++t) {
    callers.emplace_back([&, t] {
      for (int r = 0; r < kRounds; ++r) {
        const int noisy = (t + r) & 1;
        std::fill(outs[t].begin(), outs[t].end(), -1.0f);
        fused_update_cpu(args_for(outs[t].data(), noisy != 0), 2);
        if (std::memcmp(outs[t].data(), want[noisy].data(), x.size() * sizeof(float)) != 0) {
          ++bad[t];
        }
      }
    });
  }
  for (auto& c : callers) c.join();
  for (int t = 0; t < kCallers; ++t) {
    CHECK(bad[t] == 0, "%s caller %d: %d of %d rounds differ from one thread", isa.c_str(), t,
          bad[t], kRounds);
  }
  // and from this thread alone, many small-task rounds in a row
  std::vector<float> o(x.size());
  int differ = 0;
  for (int r = 0; r < 20; ++r) {
    fused_update_cpu(args_for(o.data(), (r & 1) != 0), 2);
    differ += std::memcmp(o.data(), want[r & 1].data(), x.size() * sizeof(float)) != 0;
  }
  CHECK(differ == 0, "%s: %d of 20 2-thread rounds differ from one thread", isa.c_str(), differ);
}

// ---- validation ----------------------------------------------------------------------------

template <class F>
bool throws_invalid(F f) {
  try {
    f();
  } catch (const std::invalid_argument&) {
    return true;
  }
  return false;
}

void test_validation() {
  std::vector<float> x(10, 1.0f), y(10, 2.0f), o(10);
  FusedUpdateArgs ok;
  ok.out = o.data();
  ok.K = 2;
  ok.bufs[0] = x.data();
  ok.bufs[1] = y.data();
  ok.batch = 2;
  ok.numel = 5;
  auto with = [&](auto edit) {
    FusedUpdateArgs a = ok;
    edit(a);
    return throws_invalid([&] { fused_update_cpu(a, 1); });
  };
  CHECK(!with([](FusedUpdateArgs&) {}), "valid arguments rejected");
  CHECK(with([](FusedUpdateArgs& a) { a.K = 0; }), "K = 0");
  CHECK(with([](FusedUpdateArgs& a) { a.K = kKMax + 1; }), "K > K_MAX");
  CHECK(with([](FusedUpdateArgs& a) { a.batch = -1; }), "negative batch");
  CHECK(with([](FusedUpdateArgs& a) { a.out_dtype = 7; }), "bad out dtype");
  CHECK(with([](FusedUpdateArgs& a) { a.buf_dtypes[1] = -1; }), "bad buf dtype");
  CHECK(with([](FusedUpdateArgs& a) { a.out = nullptr; }), "null out");
  CHECK(with([](FusedUpdateArgs& a) { a.bufs[1] = nullptr; }), "null buf");
  CHECK(with([](FusedUpdateArgs& a) { a.noise_mode = 5; }), "bad noise mode");
  CHECK(with([](FusedUpdateArgs& a) { a.noise_mode = kPhiloxNoise; }), "philox without seeds");
  CHECK(with([](FusedUpdateArgs& a) { a.noise_mode = kTensorNoise; }), "noise without array");
  CHECK(with([&](FusedUpdateArgs& a) { a.out = x.data() + 1; }), "partial overlap");
  CHECK(!with([&](FusedUpdateArgs& a) { a.out = x.data(); }), "exact alias rejected");
  CHECK(with([&](FusedUpdateArgs& a) {
          a.out = x.data();
          a.out_dtype = kBFloat16;
        }), "alias with another dtype");
  CHECK(with([&](FusedUpdateArgs& a) {
          a.aux = o.data() + 2;
        }), "aux overlapping out");
  CHECK(!with([](FusedUpdateArgs& a) {
          a.batch = 0;
          a.out = nullptr;
        }), "empty update needs no pointers");
  std::vector<float> m(10, 0.5f);
  CHECK(!with([&](FusedUpdateArgs& a) { a.mask = m.data(); }), "valid mask rejected");
  CHECK(!with([&](FusedUpdateArgs& a) { a.mask = x.data(); }), "mask = an input rejected");
  CHECK(with([&](FusedUpdateArgs& a) {
          a.mask = m.data();
          a.mask_dtype = 9;
        }), "bad mask dtype");
  CHECK(with([&](FusedUpdateArgs& a) { a.mask = o.data(); }), "mask aliasing out");
  CHECK(with([&](FusedUpdateArgs& a) {
          a.mask = m.data();
          a.aux = m.data() + 4;
        }), "aux overlapping the mask");
  CHECK(throws_invalid([] { set_cpu_isa("sse9"); }), "unknown isa");
}

}  // namespace

int main() {
  test_philox_known_answers();
  test_normal_transform_exhaustive();
  test_half_conversions();
  test_validation();
  for (const std::string& isa : cpu_isas()) {
    set_cpu_isa(isa);
    test_philox_words_vectorized(isa);
    test_normals(isa);
    test_kernel(isa);
    test_pool_concurrent_callers(isa);
  }
  if (failures) {
    std::fprintf(stderr, "%d of %d checks failed\n", failures, checks);
    return 1;
  }
  std::printf("all %d checks passed (cpu builds:", checks);
  for (const std::string& isa : cpu_isas()) std::printf(" %s", isa.c_str());
  std::printf(")\n");
  return 0;
}
