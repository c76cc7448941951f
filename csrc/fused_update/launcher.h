// The launchers: validate a FusedUpdateArgs, then run the CPU kernel or launch the CUDA one.
//
// Torch-free and pybind11-free. Invalid arguments throw std::invalid_argument naming the
// argument (the bindings turn it into ValueError); CUDA failures throw std::runtime_error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fused_update.h"

namespace pyengine {

// Checks counts, pointers and dtype codes, and that out and aux overlap no input except by
// being the very same array (same address and dtype), and not each other nor the mask (which
// they may not alias at all). Device pointers
// live in CUDA's unified address space, so the same address-range test holds for them.
void validate_fused_update(const FusedUpdateArgs& a);

void fused_update_cpu(const FusedUpdateArgs& a, int num_threads);

// The CPU kernel's instruction-set builds: those this build and CPU can run ("baseline",
// "avx2"), the one in use (the best, by default), and a switch for tests and benchmarks.
std::vector<std::string> cpu_isas();
std::string cpu_isa();
std::string set_cpu_isa(const std::string& isa);

// Whether the CUDA kernel was compiled into this build.
bool cuda_compiled();

// Launches on `stream` (a cudaStream_t as an integer: torch.cuda.current_stream().cuda_stream)
// on device `device`; every pointer in `a` is device memory, coefficients by value or tables.
void fused_update_cuda(const FusedUpdateArgs& a, int device, uintptr_t stream);

// float32 normals [batch, numel] and raw Philox words, for the tests of the noise stream.
void philox_normal_cpu(float* out, const uint64_t* seeds, int64_t batch, int64_t numel,
                       uint32_t step);
void philox_words_cpu(uint32_t* out, uint64_t seed, uint32_t step, uint64_t q0, int64_t nq);

}  // namespace pyengine
