// The fused-update contract (DESIGN.md s.5) as plain data, shared by the CPU and CUDA kernels.
//
//   res = sum_k c_k * buf_k + c_z * z          aux = sum_k a_k * buf_k   (optional)
//   out = res                                  without a mask
//   out = m * res + (1 - m) * base             with a mask m, base = sum_k b_k * buf_k
//
// pyengine/fused_update/ holds the Python side (its one validator runs before this struct is
// filled; csrc/bindings.cpp exposes the struct as _C.FusedUpdateArgs, set by field name).
// Torch-free: raw pointers, element counts and dtype codes (dtypes.h). Every tensor is a
// contiguous [batch, numel] array; coefficients are float64, per step (by value) or per
// sample (a [batch, K] table in the memory of the device that runs the kernel).
//
// z of sample b is the Philox stream keyed by (seeds[b], step), or (seeds[b], steps[b]) when
// a per-sample step array is given: a batch mixing requests at different steps of their plans
// still runs one update, each sample's noise that of the sample updated alone.
//
// The inpainting blend (mask non-null): m is read in its own storage dtype and converted to
// the compute type C; every operation rounds in C in this order (pyengine/backends/torch_ref.py
// is the definition): res and base accumulated k = 0, 1, .. K-1, then res += c_z z, then
// out = m * res + (1 - m) * base, stored once. aux is not masked. The mask must not overlap
// out or aux (it may be one of the inputs).
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace pyengine {

// The most buffers one update reads: the C++/CUDA definition; Python's is
// pyengine.fused_update.K_MAX (tests/test_fused_update.py asserts they are equal).
constexpr int kKMax = 8;

enum NoiseMode : int {
  kNoNoise = 0,      // c_z = 0: nothing drawn
  kPhiloxNoise = 1,  // z from Philox keyed by (seeds[b], step), counter = element index
  kTensorNoise = 2,  // z read from `noise` (bit-compatibility with other libraries)
};

struct FusedUpdateArgs {
  void* out = nullptr;
  int out_dtype = kFloat32;
  void* aux = nullptr;  // nullptr: no aux output
  int aux_dtype = kFloat32;

  int K = 0;
  const void* bufs[kKMax] = {};
  int buf_dtypes[kKMax] = {};
  int64_t batch = 0;
  int64_t numel = 0;  // elements per sample

  double coef[kKMax] = {};               // per-step coefficients (used when coef_table is null)
  const double* coef_table = nullptr;    // per-sample [batch, K]
  double aux_coef[kKMax] = {};
  const double* aux_coef_table = nullptr;

  int noise_mode = kNoNoise;
  double noise_coef = 0.0;                   // per-step c_z (used when noise_coef_table is null)
  const double* noise_coef_table = nullptr;  // per-sample [batch]
  const uint64_t* seeds = nullptr;           // [batch], kPhiloxNoise
  uint32_t step = 0;                         // Philox draw number, kPhiloxNoise
  const int64_t* steps = nullptr;            // per-sample draw numbers [batch] (their low 32
                                             // bits) instead of `step`; nullptr: `step`
  const void* noise = nullptr;               // [batch, numel], kTensorNoise
  int noise_dtype = kFloat32;

  const void* mask = nullptr;                // [batch, numel]; nullptr: no blend
  int mask_dtype = kFloat32;
  double mask_coef[kKMax] = {};              // per-step b_k (used when mask_coef_table is null)
  const double* mask_coef_table = nullptr;   // per-sample [batch, K]

  bool compute_f64 = false;  // float64 arithmetic (else float32)
};

}  // namespace pyengine
