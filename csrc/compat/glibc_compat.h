// Force-included (-include) into every C++ source of fastgen._C by setup.py, with
// csrc/compat/sys/single_threaded.h: they keep the extension's glibc floor at or below torch's own
// (manylinux_2_28; the repaired wheel is manylinux_2_24), so that it installs wherever torch does.
//
// glibc 2.29 added new versions of exp, exp2, log, log2 and pow (the same functions without the
// old SVID error-handling wrapper); a build on a newer glibc binds to them and needs GLIBC_2.29.
// The directives below bind the references to the versions every x86-64 glibc has (2.2.5):
// identical results; the kernels' hot loops use their own vector math, not libm.
#pragma once
#if defined(__x86_64__) && defined(__linux__)
#include <features.h>
#if defined(__GLIBC__)
__asm__(".symver exp,exp@GLIBC_2.2.5");
__asm__(".symver exp2,exp2@GLIBC_2.2.5");
__asm__(".symver log,log@GLIBC_2.2.5");
__asm__(".symver log2,log2@GLIBC_2.2.5");
__asm__(".symver pow,pow@GLIBC_2.2.5");
#endif
#endif
