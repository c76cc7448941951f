// The fused-update contract (DESIGN.md s.5) as plain data, shared by the CPU and CUDA kernels.
//
//   out = sum_k c_k * buf_k + c_z * z          aux = sum_k a_k * buf_k   (optional)
//
// Torch-free: raw pointers, element counts and dtype codes (dtypes.h). Every tensor is a
// contiguous [batch, numel] array; coefficients are float64, per step (by value) or per
// sample (a [batch, K] table in the memory of the device that runs the kernel).
#pragma once

#include <cstdint>

#include "dtypes.h"

namespace pyengine {

constexpr int kKMax = 8;  // the most buffers one update reads (pyengine.plan.K_MAX)

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
  const void* noise = nullptr;               // [batch, numel], kTensorNoise
  int noise_dtype = kFloat32;

  bool compute_f64 = false;  // float64 arithmetic (else float32)
};

}  // namespace pyengine
