// One instruction-set build of the CPU kernel (fused_update_cpu.h): the baseline x86-64 /
// portable one here; fused_update_cpu_avx2.cpp includes this file with AVX2, FMA and F16C
// enabled. launcher.cpp picks one at run time from the CPU's features.
#include "fused_update_cpu.h"

#include "fused_update_cpu_entry.h"

#ifndef PYENGINE_CPU_ISA
#define PYENGINE_CPU_ISA baseline
#endif

namespace pyengine {
namespace cpu {
namespace PYENGINE_CPU_ISA {

void fused_update(const FusedUpdateArgs& a, int num_threads) {
  fused_update_impl(a, num_threads);
}

void philox_normal(float* out, const uint64_t* seeds, int64_t batch, int64_t numel,
                   uint32_t step) {
  philox_normal_impl(out, seeds, batch, numel, step);
}

void philox_words(uint32_t* out, uint64_t seed, uint32_t step, uint64_t q0, int64_t nq) {
  philox_words_impl(out, seed, step, q0, nq);
}

}  // namespace PYENGINE_CPU_ISA
}  // namespace cpu
}  // namespace pyengine
