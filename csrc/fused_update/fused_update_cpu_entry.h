// The entry points of each instruction-set build of the CPU kernel (fused_update_cpu*.cpp).
#pragma once

#include <cstdint>

#include "fused_update.h"

namespace pyengine {
namespace cpu {

#define PYENGINE_DECLARE_CPU_KERNEL(isa)                                                     \
  namespace isa {                                                                            \
  void fused_update(const FusedUpdateArgs& a, int num_threads);                              \
  void philox_normal(float* out, const uint64_t* seeds, int64_t batch, int64_t numel,        \
                     uint32_t step);                                                         \
  void philox_words(uint32_t* out, uint64_t seed, uint32_t step, uint64_t q0, int64_t nq);   \
  }

PYENGINE_DECLARE_CPU_KERNEL(baseline)
PYENGINE_DECLARE_CPU_KERNEL(avx2)
#undef PYENGINE_DECLARE_CPU_KERNEL

}  // namespace cpu
}  // namespace pyengine
