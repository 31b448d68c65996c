// spread_noise compute code, AVX-512 path (x86-64-v4). See csrc/cpu/isa_begin.h.
#if defined(__x86_64__) && !defined(FASTGEN_NATIVE_BUILD)
#define FASTGEN_ISA 2
#include "../spread_noise_kernel.h"
#endif
