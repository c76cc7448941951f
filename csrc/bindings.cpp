// pyengine._C: the only translation unit that includes pybind11.
//
// No libtorch: Python passes data pointers (ints), element counts and dtype codes
// (pyengine/backends/_native.py builds them from tensors after validating).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "fused_update/launcher.h"

#ifndef PYENGINE_VERSION_INFO
#define PYENGINE_VERSION_INFO "dev"
#endif

namespace py = pybind11;
using pyengine::FusedUpdateArgs;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

FusedUpdateArgs make_args(uintptr_t out, int out_dtype, uintptr_t aux, int aux_dtype,
                          const std::vector<uintptr_t>& bufs, const std::vector<int>& buf_dtypes,
                          int64_t batch, int64_t numel, const std::vector<double>& coef,
                          uintptr_t coef_table, const std::vector<double>& aux_coef,
                          uintptr_t aux_coef_table, int noise_mode, double noise_coef,
                          uintptr_t noise_coef_table, uintptr_t seeds, uint32_t step,
                          uintptr_t steps, uintptr_t noise, int noise_dtype, uintptr_t mask,
                          int mask_dtype, const std::vector<double>& mask_coef,
                          uintptr_t mask_coef_table, bool compute_f64) {
  FusedUpdateArgs a;
  const size_t K = bufs.size();
  if (K < 1 || K > static_cast<size_t>(pyengine::kKMax)) {
    throw std::invalid_argument("bufs must hold 1 to " + std::to_string(pyengine::kKMax) +
                                " arrays, got " + std::to_string(K));
  }
  if (buf_dtypes.size() != K) throw std::invalid_argument("buf_dtypes must have one code per buf");
  if (!coef_table && coef.size() != K) {
    throw std::invalid_argument("coef has " + std::to_string(coef.size()) + " entries for " +
                                std::to_string(K) + " buffers");
  }
  if (aux && !aux_coef_table && aux_coef.size() != K) {
    throw std::invalid_argument("aux_coef has " + std::to_string(aux_coef.size()) +
                                " entries for " + std::to_string(K) + " buffers");
  }
  if (mask && !mask_coef_table && mask_coef.size() != K) {
    throw std::invalid_argument("mask_coef has " + std::to_string(mask_coef.size()) +
                                " entries for " + std::to_string(K) + " buffers");
  }
  a.out = ptr<void>(out);
  a.out_dtype = out_dtype;
  a.aux = ptr<void>(aux);
  a.aux_dtype = aux_dtype;
  a.K = static_cast<int>(K);
  for (size_t k = 0; k < K; ++k) {
    a.bufs[k] = ptr<const void>(bufs[k]);
    a.buf_dtypes[k] = buf_dtypes[k];
    if (!coef_table) a.coef[k] = coef[k];
    if (aux && !aux_coef_table) a.aux_coef[k] = aux_coef[k];
    if (mask && !mask_coef_table) a.mask_coef[k] = mask_coef[k];
  }
  a.batch = batch;
  a.numel = numel;
  a.coef_table = ptr<const double>(coef_table);
  a.aux_coef_table = ptr<const double>(aux_coef_table);
  a.noise_mode = noise_mode;
  a.noise_coef = noise_coef;
  a.noise_coef_table = ptr<const double>(noise_coef_table);
  a.seeds = ptr<const uint64_t>(seeds);
  a.step = step;
  a.steps = ptr<const int64_t>(steps);
  a.noise = ptr<const void>(noise);
  a.noise_dtype = noise_dtype;
  a.mask = ptr<const void>(mask);
  a.mask_dtype = mask_dtype;
  a.mask_coef_table = ptr<const double>(mask_coef_table);
  a.compute_f64 = compute_f64;
  return a;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine native extension: the fused update (C++ CPU, CUDA) and Philox noise";
  m.attr("__version__") = PYENGINE_VERSION_INFO;
  m.attr("K_MAX") = pyengine::kKMax;
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = int(pyengine::kFloat32),
                                   py::arg("float64") = int(pyengine::kFloat64),
                                   py::arg("float16") = int(pyengine::kFloat16),
                                   py::arg("bfloat16") = int(pyengine::kBFloat16));

  m.def("has_cuda", &pyengine::cuda_compiled,
        "Whether the CUDA kernels were compiled into this build.");

  m.def("cpu_isas", &pyengine::cpu_isas,
        "The instruction-set builds of the CPU kernel this build and CPU can run.");
  m.def("cpu_isa", &pyengine::cpu_isa, "The CPU kernel build in use (the best by default).");
  m.def("set_cpu_isa", &pyengine::set_cpu_isa, py::arg("isa"),
        "Use another CPU kernel build (tests, benchmarks); returns the previous one.");

  m.def(
      "fused_update_cpu",
      [](uintptr_t out, int out_dtype, uintptr_t aux, int aux_dtype,
         const std::vector<uintptr_t>& bufs, const std::vector<int>& buf_dtypes, int64_t batch,
         int64_t numel, const std::vector<double>& coef, uintptr_t coef_table,
         const std::vector<double>& aux_coef, uintptr_t aux_coef_table, int noise_mode,
         double noise_coef, uintptr_t noise_coef_table, uintptr_t seeds, uint32_t step,
         uintptr_t steps, uintptr_t noise, int noise_dtype, uintptr_t mask, int mask_dtype,
         const std::vector<double>& mask_coef, uintptr_t mask_coef_table, bool compute_f64,
         int num_threads) {
        const FusedUpdateArgs a =
            make_args(out, out_dtype, aux, aux_dtype, bufs, buf_dtypes, batch, numel, coef,
                      coef_table, aux_coef, aux_coef_table, noise_mode, noise_coef,
                      noise_coef_table, seeds, step, steps, noise, noise_dtype, mask,
                      mask_dtype, mask_coef, mask_coef_table, compute_f64);
        py::gil_scoped_release release;
        pyengine::fused_update_cpu(a, num_threads);
      },
      "out = sum_k coef_k bufs_k + noise_coef z, aux = sum_k aux_coef_k bufs_k on host memory "
      "(pointers, element counts, dtype codes; tables of 0 mean per-step scalars; steps of 0 "
      "means the scalar step; a mask blends out with sum_k mask_coef_k bufs_k).");

  m.def(
      "fused_update_cuda",
      [](uintptr_t out, int out_dtype, uintptr_t aux, int aux_dtype,
         const std::vector<uintptr_t>& bufs, const std::vector<int>& buf_dtypes, int64_t batch,
         int64_t numel, const std::vector<double>& coef, uintptr_t coef_table,
         const std::vector<double>& aux_coef, uintptr_t aux_coef_table, int noise_mode,
         double noise_coef, uintptr_t noise_coef_table, uintptr_t seeds, uint32_t step,
         uintptr_t steps, uintptr_t noise, int noise_dtype, uintptr_t mask, int mask_dtype,
         const std::vector<double>& mask_coef, uintptr_t mask_coef_table, bool compute_f64,
         int device, uintptr_t stream) {
        const FusedUpdateArgs a =
            make_args(out, out_dtype, aux, aux_dtype, bufs, buf_dtypes, batch, numel, coef,
                      coef_table, aux_coef, aux_coef_table, noise_mode, noise_coef,
                      noise_coef_table, seeds, step, steps, noise, noise_dtype, mask,
                      mask_dtype, mask_coef, mask_coef_table, compute_f64);
        pyengine::fused_update_cuda(a, device, stream);
      },
      "The same on device memory, launched on the CUDA stream given as an integer handle.");

  m.def(
      "philox_normal",
      [](uintptr_t out, uintptr_t seeds, int64_t batch, int64_t numel, uint32_t step) {
        pyengine::philox_normal_cpu(ptr<float>(out), ptr<const uint64_t>(seeds), batch, numel,
                                    step);
      },
      "float32 normals [batch, numel] of the kernels' noise (seeds: uint64 [batch]).");

  m.def(
      "philox_words",
      [](uintptr_t out, uint64_t seed, uint32_t step, uint64_t q0, int64_t nq) {
        pyengine::philox_words_cpu(ptr<uint32_t>(out), seed, step, q0, nq);
      },
      "Raw Philox-4x32-10 words of quads q0..q0+nq-1 into uint32 [nq, 4].");
}
