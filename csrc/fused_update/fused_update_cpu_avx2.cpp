// The CPU kernel built with AVX2, FMA and F16C (CMakeLists.txt sets the flags on this file):
// 8-lane float32 and hardware float16 conversions. Used when the CPU has them.
#define PYENGINE_CPU_ISA avx2
#include "fused_update_cpu.cpp"
