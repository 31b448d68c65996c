// Shared prelude of the per-ISA compute code (csrc/cpu/<op>_kernel.h). Everything included or
// defined here is compiled for the default target of the build (x86-64 / aarch64): it is included
// BEFORE isa_begin.h switches the target, so that the std:: templates and inline functions it
// defines (std::sort, std::vector, the fp16 conversions, ...) are the same code in every
// translation unit. Templates defined after isa_begin.h live in a per-ISA namespace: no two ISAs
// ever share (and so the linker never mixes) a symbol compiled for different instruction sets.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
// GCC vector-extension types in internal inline helpers only: no ABI to keep stable
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace fastgen_cpu {

template <typename To, typename From>
inline To bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bitcast size");
  return __builtin_bit_cast(To, v);
}

// IEEE half and bfloat16 as raw uint16 storage with round-to-nearest-even conversions, bit for
// bit those of c10::Half / c10::BFloat16 (NaN -> 0x7E00 | sign, resp. 0x7FC0). Integer-only
// arithmetic: no float operation the compiler could contract into an FMA.
struct Half {
  uint16_t x;
  Half() = default;
  explicit Half(float f) : x(from_float(f)) {}
  operator float() const { return to_float(x); }
  __attribute__((always_inline)) static inline float to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bitcast<float>(sign | 0x7f800000u | (m << 13));
    if (e == 0) {
      if (m == 0) return bitcast<float>(sign);
      // subnormal: m 2^-24, normalised (exact)
      int sh = __builtin_clz(m) - 21;  // shifts that bring bit 10 to the top of the 11-bit field
      const uint32_t mm = (m << sh) & 0x3ffu;
      return bitcast<float>(sign | ((uint32_t)(113 - sh) << 23) | (mm << 13));
    }
    return bitcast<float>(sign | ((e + 112u) << 23) | (m << 13));
  }
  __attribute__((always_inline)) static inline uint16_t from_float(float f) {
    const uint32_t w = bitcast<uint32_t>(f);
    const uint32_t sign = (w >> 16) & 0x8000u;
    const uint32_t ax = w & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  // NaN
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to inf (>= 65520)
    if (ax < 0x38800000u) {                                   // below 2^-14: subnormal or zero
      if (ax <= 0x33000000u) return (uint16_t)sign;           // <= 2^-25: rounds to 0
      const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;
      const uint32_t shift = 126u - e;  // 14..24
      uint32_t r = m >> shift;
      const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
      r += (rem > half || (rem == half && (r & 1u))) ? 1u : 0u;
      return (uint16_t)(sign | r);
    }
    const uint32_t r = ax - 0x38000000u;  // rebias the exponent 127 -> 15
    return (uint16_t)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
  }
};

struct BFloat16 {
  uint16_t x;
  BFloat16() = default;
  explicit BFloat16(float f) : x(from_float(f)) {}
  operator float() const { return bitcast<float>((uint32_t)x << 16); }
  __attribute__((always_inline)) static inline uint16_t from_float(float f) {
    const uint32_t u = bitcast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

}  // namespace fastgen_cpu
