// Opens the per-ISA region of a compute translation unit (csrc/cpu/isa/<op>_<isa>.cpp): switches
// the compiler's target to the instruction set FASTGEN_ISA names and opens the namespace
// fastgen_cpu::FASTGEN_ISA_NS. Include after kernel_common.h, close with isa_end.h.
//   FASTGEN_ISA 0: baseline. x86-64: x86-64-v2 (SSE4.2, POPCNT); elsewhere the build's default.
//   FASTGEN_ISA 1: AVX2 + FMA (x86-64-v3: AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE).
//   FASTGEN_ISA 2: AVX-512 (x86-64-v4: AVX512F/VL/BW/DQ/CD), 512-bit vectors preferred.
// FASTGEN_NATIVE_BUILD (FASTGEN_NATIVE=1): no target switch, the build's -march=native flags;
// FASTGEN_ISA_LEVEL is then derived from the compiler's macros.
// The mechanism is GCC's `#pragma GCC target` (Clang: `#pragma clang attribute` with the target
// attribute): every function defined in the region is compiled for the ISA, the OpenMP regions
// outlined from them included; code included before the region (the C++ library) is not.
#ifndef FASTGEN_ISA
#error "define FASTGEN_ISA (0 baseline, 1 avx2, 2 avx512) before including isa_begin.h"
#endif

#if defined(FASTGEN_NATIVE_BUILD)
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX512DQ__)
#define FASTGEN_ISA_LEVEL 2
#elif defined(__AVX2__) && defined(__FMA__)
#define FASTGEN_ISA_LEVEL 1
#else
#define FASTGEN_ISA_LEVEL 0
#endif
#else
#define FASTGEN_ISA_LEVEL FASTGEN_ISA
#if !defined(__x86_64__) && FASTGEN_ISA != 0
#error "the avx2 / avx512 paths are x86-64 only"
#endif
#if defined(__x86_64__)
// (#pragma GCC target does not expand macros: one literal pragma per path)
#if defined(__clang__)
#if FASTGEN_ISA == 0
#pragma clang attribute push(__attribute__((target("sse4.2,popcnt"))), apply_to = function)
#elif FASTGEN_ISA == 1
#pragma clang attribute push(__attribute__((target("sse4.2,popcnt,avx,avx2,fma,bmi,bmi2,f16c,lzcnt,movbe"))), apply_to = function)
#else
#pragma clang attribute push(__attribute__((target("sse4.2,popcnt,avx,avx2,fma,bmi,bmi2,f16c,lzcnt,movbe,avx512f,avx512vl,avx512bw,avx512dq,avx512cd"))), apply_to = function)
#endif
#else
#pragma GCC push_options
#if FASTGEN_ISA == 0
#pragma GCC target("sse4.2,popcnt")
#elif FASTGEN_ISA == 1
#pragma GCC target("sse4.2,popcnt,avx,avx2,fma,bmi,bmi2,f16c,lzcnt,movbe")
#else
#pragma GCC target("sse4.2,popcnt,avx,avx2,fma,bmi,bmi2,f16c,lzcnt,movbe,avx512f,avx512vl,avx512bw,avx512dq,avx512cd,prefer-vector-width=512")
#endif
#endif
#define FASTGEN_TARGET_PUSHED 1
#endif
#endif

#if FASTGEN_ISA == 0
#define FASTGEN_ISA_NS baseline
#elif FASTGEN_ISA == 1
#define FASTGEN_ISA_NS avx2
#else
#define FASTGEN_ISA_NS avx512
#endif

namespace fastgen_cpu {
namespace FASTGEN_ISA_NS {
// the entry points this translation unit defines (checked against kernels.h)
FASTGEN_CPU_KERNEL_DECLS
