// Vector math of the CPU kernels (included inside the per-ISA namespace by <op>_kernel.h, so each
// instruction set gets its own code): branch-free float polynomials that the compiler keeps in
// vector registers (GCC does not vectorise a loop calling logf / expf without -ffast-math).
// Accuracy: the max error over a dense sweep of the domain (every 61st-509th float), measured on
// every path by tests/isa_check.py (run per path by tests/test_cpu_isa.py), which enforces the
// stated bound. Measured baseline / avx2 / avx512 (the FMA paths round differently):
//   vexp   (gaussian_nll)            exp on [-104, 88.7] (inf above, NaN kept), Cephes expf:
//                                    0.96 / 1.003 / 1.003 ulp                        bound 1.1 ulp
//   vlog   (gaussian_nll)            log on all floats > 0 (subnormals, 0 -> -inf, inf), musl logf:
//                                    0.82 / 0.74 / 0.74 ulp                          bound 1.0 ulp
//   fg_exp_neg / vexp_neg (sll)      exp on [-87, 0] (0 below -87, vexp_neg: NaN -> NaN):  0.97 / 0.98 / 0.98 ulp, bound 1.1
//   fg_log (spread_noise)            log on [2^-32, 1], Cephes logf: 0.80 / 0.79 / 0.79 ulp, bound 1.0
//   fg_sincos2pi_u32 (spread_noise)  sin, cos(2 pi b 2^-32), all uint32 b: absolute error
//                                    1.08e-7 / 1.09e-7 / 1.09e-7                     bound 1.5e-7
// (spread_noise's avx2 / avx512 paths run the same polynomials on explicit vectors:
// spread_noise_kernel.h n_log / n_sincos2pi; they are checked through the noise itself.)

namespace {

// ---- W-lane GCC / Clang vector extensions, one native register: 16 lanes (AVX-512), 8 (AVX2),
// 4 (SSE / NEON). Wider types than the registers are a trap: GCC passes a 64-byte vector through
// memory on AVX2 wherever a helper is not inlined (measured: gaussian_nll 4.4x slower than the
// AVX-512 path). Every helper is forced inline for the same reason.
#define FG_INLINE inline __attribute__((always_inline))
#if FASTGEN_ISA_LEVEL == 2
constexpr int64_t W = 16;
#elif FASTGEN_ISA_LEVEL == 1
constexpr int64_t W = 8;
#else
constexpr int64_t W = 4;
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));
typedef uint32_t vu __attribute__((vector_size(4 * W)));
// 16 lanes whatever the ISA (spread_log_likelihood's tiles of 16 samples)
typedef float vf16 __attribute__((vector_size(64)));

FG_INLINE vf splat(float a) { return vf{} + a; }
FG_INLINE vi splati(int32_t a) { return vi{} + a; }
FG_INLINE vf sel(vi m, vf a, vf b) { return m ? a : b; }  // lane-wise m ? a : b

// log(x), after musl's logf (fdlibm): max error < 1 ulp. 0 -> -inf, inf -> inf, x < 0 or
// NaN -> NaN, subnormals scaled into the normal range first.
FG_INLINE vf vlog(vf x) {
  const float ln2_hi = 6.9313812256e-01f, ln2_lo = 9.0580006145e-06f;
  const float Lg1 = 0.66666662693f, Lg2 = 0.40000972152f, Lg3 = 0.28498786688f, Lg4 = 0.24279078841f;
  const vi sub = x < 1.17549435e-38f;  // subnormal, zero or negative
  const vf xs = x * sel(sub, splat(33554432.0f), splat(1.0f));  // 2^25
  vu ix = (vu)xs;
  ix += 0x3f800000u - 0x3f3504f3u;
  const vi k = (vi)(ix >> 23) - 0x7f - (sub & 25);
  ix = (ix & 0x007fffffu) + 0x3f3504f3u;
  const vf f = (vf)ix - 1.0f;
  const vf s = f / (2.0f + f);
  const vf z = s * s;
  const vf w = z * z;
  const vf t1 = w * (Lg2 + w * Lg4);
  const vf t2 = z * (Lg1 + w * Lg3);
  const vf R = t2 + t1;
  const vf hfsq = 0.5f * f * f;
  const vf dk = __builtin_convertvector(k, vf);
  vf r = s * (hfsq + R) + dk * ln2_lo - hfsq + f + dk * ln2_hi;
  r = sel(x == std::numeric_limits<float>::infinity(), x, r);
  r = sel(x == 0.0f, splat(-std::numeric_limits<float>::infinity()), r);
  r = sel((x < 0.0f) | (x != x), splat(std::numeric_limits<float>::quiet_NaN()), r);
  return r;
}

// exp(x), Cephes expf polynomial: ~1 ulp. Overflow -> inf, underflow -> 0 through the
// subnormal range, NaN -> NaN.
FG_INLINE vf vexp(vf x) {
  const float log2e = 1.44269504088896341f;
  const float c1 = 0.693359375f, c2 = -2.12194440e-4f;
  vf xc = sel(x > 88.8f, splat(88.8f), x);
  xc = sel(xc < -104.0f, splat(-104.0f), xc);
  xc = sel(x != x, splat(0.0f), xc);
  const vf y = xc * log2e + 0.5f;
  vi ni = __builtin_convertvector(y, vi);  // truncation; make it floor
  ni += (vi)(__builtin_convertvector(ni, vf) > y);
  const vf n = __builtin_convertvector(ni, vf);  // in [-150, 129]
  const vf r = xc - n * c1 - n * c2;
  const vf r2 = r * r;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const vi n1 = ni >> 1, n2 = ni - n1;  // each in [-75, 65]: 2^n1 and 2^n2 are normal floats
  const vf s1 = (vf)((vu)(n1 + 127) << 23);
  const vf s2 = (vf)((vu)(n2 + 127) << 23);
  vf out = p * s1 * s2;
  out = sel(x > 88.72283935546875f, splat(std::numeric_limits<float>::infinity()), out);
  out = sel(x != x, x, out);
  return out;
}


// exp(x) for x <= 0 (Cephes expf), exp(x) = 0 below -87. Branch-free and free of float->int
// conversions and float compares (which, under the default -ftrapping-math, stop GCC from
// vectorising the loop): the clamp is an integer compare on the bit pattern (x <= 0), the
// rounding to an integer multiple of ln 2 uses the 1.5 * 2^23 trick.
FG_INLINE float fg_exp_neg(float x) {
  const uint32_t ux = bitcast<uint32_t>(x);
  const uint32_t lim = 0xC2AE0000u;  // bits of -87.0f; for x <= 0, larger bits = more negative
  const uint32_t keep = ux > lim ? 0u : 0xffffffffu;
  x = bitcast<float>(ux > lim ? lim : ux);
  const float magic = 12582912.0f;
  const float t = x * 1.44269504088896341f + magic;
  const int32_t n = bitcast<int32_t>(t) - bitcast<int32_t>(magic);
  const float fx = t - magic;
  x = x - fx * 0.693359375f;
  x = x + fx * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const float p2 = bitcast<float>((uint32_t)(n + 127) << 23);
  return bitcast<float>(bitcast<uint32_t>(y * p2) & keep);
}
// exp(x) lane-wise for x <= 0: the polynomial of fg_exp_neg on one native register (W lanes).
FG_INLINE vf vexp_neg_w(vf x) {
  const uint32_t lim = 0xC2AE0000u;  // bits of -87.0f
  const vi under = x < -87.0f;       // -1 where x < -87 (and -inf); NaN stays NaN
  x = (vf)(((vu)x & ~(vu)under) | ((vu)under & lim));
  const float magic = 12582912.0f;
  const vf t = x * 1.44269504088896341f + magic;
  const vi n = (vi)t - (int32_t)0x4B400000;  // bits of magic
  const vf fx = t - magic;
  x = x - fx * 0.693359375f;
  x = x + fx * 2.12194440e-4f;
  const vf z = x * x;
  vf y = x * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const vf p2 = (vf)((n + 127) << 23);
  return (vf)((vi)(y * p2) & ~under);
}
// the same on 16 lanes, one native register at a time: GCC 12 scalarises compares of vectors
// wider than the registers (measured: half of the AVX2 forward's time went to vcomiss / seta).
FG_INLINE vf16 vexp_neg(vf16 x) {
  vf16 out;
  for (int i = 0; i < (int)(16 / W); ++i) {
    vf p;
    std::memcpy(&p, reinterpret_cast<const char*>(&x) + i * sizeof(vf), sizeof(vf));
    p = vexp_neg_w(p);
    std::memcpy(reinterpret_cast<char*>(&out) + i * sizeof(vf), &p, sizeof(vf));
  }
  return out;
}
// natural log of x > 0 (normal), Cephes logf.
FG_INLINE float fg_log(float x) {
  uint32_t ix = bitcast<uint32_t>(x);
  int e = (int)((ix >> 23) & 0xff) - 126;             // x = m 2^e, m in [0.5, 1)
  float m = bitcast<float>((ix & 0x007fffffu) | 0x3f000000u);
  const bool small = m < 0.707106781186547524f;
  e -= (int)small;
  m = (small ? m + m : m) - 1.0f;
  float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  float fe = (float)e;
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// sin(2 pi b 2^-32), cos(2 pi b 2^-32) for a uint32 b: the quadrant reduction is exact integer
// arithmetic, then Cephes polynomials on [-pi/4, pi/4].
FG_INLINE void fg_sincos2pi_u32(uint32_t b, float& s, float& c) {
  uint32_t q = (b + (1u << 29)) >> 30;               // nearest quarter turn (mod 4 after wrap)
  int32_t rr = (int32_t)(b - (q << 30));             // [-2^29, 2^29)
  float x = (float)rr * 1.4629180792671596e-09f;     // 2^-30 * pi / 2  ->  [-pi/4, pi/4)
  float z = x * x;
  float sp = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  float cp = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z
             - 0.5f * z + 1.0f;
  bool swap = (q & 1u) != 0;
  float sv = swap ? cp : sp;
  float cv = swap ? sp : cp;
  s = bitcast<float>(bitcast<uint32_t>(sv) ^ ((q & 2u) << 30));
  c = bitcast<float>(bitcast<uint32_t>(cv) ^ (((q + 1u) & 2u) << 30));
}

// sqrt(t) for t >= 0 from arithmetic only (std::sqrt sets errno, which stops GCC from
// vectorising the loop without -fno-math-errno): inverse-sqrt seed + 3 Newton steps (rel. err.
// < 2e-7), sqrt(0) = 0.
FG_INLINE float fg_sqrt(float t) {
  float tt = t > 1e-30f ? t : 1e-30f;
  float y = bitcast<float>(0x5f3759dfu - (bitcast<uint32_t>(tt) >> 1));
  float h = 0.5f * tt;
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  return t * y;
}


}  // namespace
