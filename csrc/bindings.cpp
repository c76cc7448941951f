// pyengine._C: the only translation unit that includes pybind11.
//
// No libtorch: Python (pyengine/fused_update/native.py, after the op package's validator)
// fills one FusedUpdateArgs by field name -- data pointers as ints, element counts, dtype
// codes -- and passes it to the CPU or CUDA entry point. The launcher validates it again
// (the bindings are public), so a hand-made struct gets a ValueError naming the field.
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
using pyengine::kKMax;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

[[noreturn]] void fail(const std::string& msg) { throw std::invalid_argument(msg); }

// FusedUpdateArgs plus how many entries Python gave each per-buffer list, so that a count
// that disagrees with K is an error at the call, whatever order the fields were set in.
struct BoundArgs : FusedUpdateArgs {
  int n_buf_dtypes = 0, n_coef = 0, n_aux_coef = 0, n_mask_coef = 0;

  void check_counts() const {
    const auto need = [this](int n, const char* name) {
      if (n != K) {
        fail(std::string(name) + " has " + std::to_string(n) + " entries for " +
             std::to_string(K) + " buffers");
      }
    };
    need(n_buf_dtypes, "buf_dtypes");
    if (!coef_table) need(n_coef, "coef");
    if (aux && !aux_coef_table) need(n_aux_coef, "aux_coef");
    if (mask && !mask_coef_table) need(n_mask_coef, "mask_coef");
  }
};

template <class T>
int fill(T* dst, const std::vector<T>& src, const char* name) {
  if (src.size() > static_cast<size_t>(kKMax)) {
    fail(std::string(name) + " has " + std::to_string(src.size()) + " entries; at most " +
         std::to_string(kKMax) + " (K_MAX)");
  }
  for (int k = 0; k < kKMax; ++k) dst[k] = k < static_cast<int>(src.size()) ? src[k] : T{};
  return static_cast<int>(src.size());
}

// A pointer field exposed to Python as an int address (0 for null).
template <class P, P FusedUpdateArgs::*field>
void pointer(py::class_<BoundArgs>& c, const char* name, const char* doc) {
  c.def_property(
      name, [](const BoundArgs& a) { return reinterpret_cast<uintptr_t>(a.*field); },
      [](BoundArgs& a, uintptr_t p) { a.*field = reinterpret_cast<P>(p); }, doc);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine native extension: the fused update (C++ CPU, CUDA) and Philox noise";
  m.attr("__version__") = PYENGINE_VERSION_INFO;
  m.attr("K_MAX") = kKMax;
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = int(pyengine::kFloat32),
                                   py::arg("float64") = int(pyengine::kFloat64),
                                   py::arg("float16") = int(pyengine::kFloat16),
                                   py::arg("bfloat16") = int(pyengine::kBFloat16));
  m.attr("NOISE_MODES") = py::dict(py::arg("none") = int(pyengine::kNoNoise),
                                   py::arg("philox") = int(pyengine::kPhiloxNoise),
                                   py::arg("tensor") = int(pyengine::kTensorNoise));

  py::class_<BoundArgs> args(m, "FusedUpdateArgs",
                             "The fused update's arguments (csrc/fused_update/fused_update.h), "
                             "set by field name; pointers are int addresses, 0 for none.");
  args.def(py::init<>());
  pointer<void*, &FusedUpdateArgs::out>(args, "out", "output [batch, numel]");
  args.def_readwrite("out_dtype", &BoundArgs::out_dtype);
  pointer<void*, &FusedUpdateArgs::aux>(args, "aux", "aux output, 0: none");
  args.def_readwrite("aux_dtype", &BoundArgs::aux_dtype);
  args.def_property(
      "bufs",
      [](const BoundArgs& a) {
        std::vector<uintptr_t> v;
        for (int k = 0; k < a.K; ++k) v.push_back(reinterpret_cast<uintptr_t>(a.bufs[k]));
        return v;
      },
      [](BoundArgs& a, const std::vector<uintptr_t>& v) {
        if (v.empty() || v.size() > static_cast<size_t>(kKMax)) {
          fail("bufs must hold 1 to " + std::to_string(kKMax) + " arrays, got " +
               std::to_string(v.size()));
        }
        a.K = static_cast<int>(v.size());
        for (int k = 0; k < kKMax; ++k) a.bufs[k] = k < a.K ? ptr<const void>(v[k]) : nullptr;
      },
      "input addresses (sets K)");
  args.def_readonly("K", &BoundArgs::K);
  args.def_property(
      "buf_dtypes", [](const BoundArgs& a) {
        return std::vector<int>(a.buf_dtypes, a.buf_dtypes + a.n_buf_dtypes);
      },
      [](BoundArgs& a, const std::vector<int>& v) {
        a.n_buf_dtypes = fill(a.buf_dtypes, v, "buf_dtypes");
      });
  args.def_readwrite("batch", &BoundArgs::batch);
  args.def_readwrite("numel", &BoundArgs::numel, "elements per sample");
  args.def_property(
      "coef", [](const BoundArgs& a) { return std::vector<double>(a.coef, a.coef + a.n_coef); },
      [](BoundArgs& a, const std::vector<double>& v) { a.n_coef = fill(a.coef, v, "coef"); },
      "per-step coefficients (when coef_table is 0)");
  pointer<const double*, &FusedUpdateArgs::coef_table>(args, "coef_table",
                                                       "float64 [batch, K], 0: per step");
  args.def_property(
      "aux_coef",
      [](const BoundArgs& a) { return std::vector<double>(a.aux_coef, a.aux_coef + a.n_aux_coef); },
      [](BoundArgs& a, const std::vector<double>& v) {
        a.n_aux_coef = fill(a.aux_coef, v, "aux_coef");
      });
  pointer<const double*, &FusedUpdateArgs::aux_coef_table>(args, "aux_coef_table",
                                                           "float64 [batch, K], 0: per step");
  args.def_readwrite("noise_mode", &BoundArgs::noise_mode, "NOISE_MODES");
  args.def_readwrite("noise_coef", &BoundArgs::noise_coef);
  pointer<const double*, &FusedUpdateArgs::noise_coef_table>(args, "noise_coef_table",
                                                             "float64 [batch], 0: noise_coef");
  pointer<const uint64_t*, &FusedUpdateArgs::seeds>(args, "seeds", "uint64 [batch]");
  args.def_readwrite("step", &BoundArgs::step);
  pointer<const int64_t*, &FusedUpdateArgs::steps>(args, "steps",
                                                   "int64 [batch] draw numbers, 0: step");
  pointer<const void*, &FusedUpdateArgs::noise>(args, "noise", "[batch, numel] noise tensor");
  args.def_readwrite("noise_dtype", &BoundArgs::noise_dtype);
  pointer<const void*, &FusedUpdateArgs::mask>(args, "mask", "[batch, numel], 0: no blend");
  args.def_readwrite("mask_dtype", &BoundArgs::mask_dtype);
  args.def_property(
      "mask_coef",
      [](const BoundArgs& a) {
        return std::vector<double>(a.mask_coef, a.mask_coef + a.n_mask_coef);
      },
      [](BoundArgs& a, const std::vector<double>& v) {
        a.n_mask_coef = fill(a.mask_coef, v, "mask_coef");
      });
  pointer<const double*, &FusedUpdateArgs::mask_coef_table>(args, "mask_coef_table",
                                                            "float64 [batch, K], 0: per step");
  args.def_readwrite("compute_f64", &BoundArgs::compute_f64);

  m.def("has_cuda", &pyengine::cuda_compiled,
        "Whether the CUDA kernels were compiled into this build.");

  m.def("cpu_isas", &pyengine::cpu_isas,
        "The instruction-set builds of the CPU kernel this build and CPU can run.");
  m.def("cpu_isa", &pyengine::cpu_isa, "The CPU kernel build in use (the best by default).");
  m.def("set_cpu_isa", &pyengine::set_cpu_isa, py::arg("isa"),
        "Use another CPU kernel build (tests, benchmarks); returns the previous one.");

  m.def(
      "fused_update_cpu",
      [](const BoundArgs& a, int num_threads) {
        a.check_counts();
        py::gil_scoped_release release;
        pyengine::fused_update_cpu(a, num_threads);
      },
      py::arg("args"), py::arg("num_threads"),
      "out = sum_k coef_k bufs_k + noise_coef z, aux = sum_k aux_coef_k bufs_k on host memory "
      "(a mask blends out with sum_k mask_coef_k bufs_k).");

  m.def(
      "fused_update_cuda",
      [](const BoundArgs& a, int device, uintptr_t stream) {
        a.check_counts();
        pyengine::fused_update_cuda(a, device, stream);
      },
      py::arg("args"), py::arg("device"), py::arg("stream"),
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
