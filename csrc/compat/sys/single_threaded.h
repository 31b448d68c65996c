// Shadows glibc's <sys/single_threaded.h> (glibc >= 2.32) for the build of fastgen's extensions.
//
// libstdc++ (gcc >= 11) reads glibc's `__libc_single_threaded` in its shared_ptr / locale reference
// counting when this header exists; that one reference makes the binary need GLIBC_2.32 and so a
// manylinux_2_34 wheel, while torch itself is manylinux_2_28. This stand-in says "never single
// threaded": the reference counts always use atomics (what libstdc++ does on older glibc), and the
// extension keeps its glibc floor at or below torch's. setup.py puts csrc/compat first on the include path.
#pragma once
static const char __libc_single_threaded = 0;
