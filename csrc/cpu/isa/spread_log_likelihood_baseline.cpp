// spread_log_likelihood compute code, baseline path (x86-64-v2; the build's default elsewhere; or, with
// FASTGEN_NATIVE=1, the one native path). See csrc/cpu/isa_begin.h.
#define FASTGEN_ISA 0
#include "../spread_log_likelihood_kernel.h"
