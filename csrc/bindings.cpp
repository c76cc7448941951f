// pyengine._C: the only translation unit that includes pybind11.
#include <pybind11/pybind11.h>

#ifndef PYENGINE_VERSION_INFO
#define PYENGINE_VERSION_INFO "dev"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine native extension";
  m.attr("__version__") = PYENGINE_VERSION_INFO;
  m.def("has_cuda", []() {
#ifdef PYENGINE_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "Whether the CUDA kernels were compiled into this build.");
}
