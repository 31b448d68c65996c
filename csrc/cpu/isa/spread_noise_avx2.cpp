// spread_noise compute code, AVX2 + FMA path (x86-64-v3). See csrc/cpu/isa_begin.h.
#if defined(__x86_64__) && !defined(FASTGEN_NATIVE_BUILD)
#define FASTGEN_ISA 1
#include "../spread_noise_kernel.h"
#endif
