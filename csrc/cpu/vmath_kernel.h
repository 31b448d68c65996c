// The vector math of vmath.h as the kernels use it, exposed for the ulp tests
// (fastgen::_cpu_vmath_kernel, tests/test_cpu_isa.py). Compiled once per instruction set.
#include "kernel_common.h"
#include "isa_begin.h"
#include "vmath.h"

bool vmath(int fn, const float* x, float* out, int64_t n) {
  if (fn < 0 || fn > 5) return false;
  if (fn <= 1) {
    for (int64_t i = 0; i < n; i += W) {
      alignas(64) float b[W];
      const int64_t m = std::min<int64_t>(W, n - i);
      for (int k = 0; k < W; ++k) b[k] = k < m ? x[i + k] : 1.0f;
      vf v;
      std::memcpy(&v, b, sizeof(v));
      v = fn == 0 ? vexp(v) : vlog(v);
      std::memcpy(b, &v, sizeof(v));
      for (int64_t k = 0; k < m; ++k) out[i + k] = b[k];
    }
    return true;
  }
  if (fn == 2) {
    for (int64_t i = 0; i < n; i += 16) {
      alignas(64) float b[16];
      const int64_t m = std::min<int64_t>(16, n - i);
      for (int k = 0; k < 16; ++k) b[k] = k < m ? x[i + k] : 0.0f;
      vf16 v;
      std::memcpy(&v, b, sizeof(v));
      v = vexp_neg(v);
      std::memcpy(b, &v, sizeof(v));
      for (int64_t k = 0; k < m; ++k) out[i + k] = b[k];
    }
    return true;
  }
  // the scalar helpers of spread_noise, in a loop the compiler vectorises as in the kernel
  if (fn == 3) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] = fg_log(x[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      float s, c;
      fg_sincos2pi_u32(bitcast<uint32_t>(x[i]), s, c);
      out[i] = fn == 4 ? s : c;
    }
  }
  return true;
}

#include "isa_end.h"
