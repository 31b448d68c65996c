// spread_noise: y = x + sigma * eps, eps ~ N(0, 1) or Laplace(0, 1), on CPU, one pass, OpenMP: the
// compute code, compiled once per instruction set (csrc/cpu/isa/spread_noise_<isa>.cpp, see
// isa_begin.h). The tensor boundary is csrc/cpu/spread_noise.cpp.
//
// Noise: counter-based Philox-4x32-10 (Salmon et al., SC'11), keyed by the 64-bit seed. The
// layout is shared with the Triton kernel (fastgen/ops/spread_noise.py) so that both produce the
// same uint32 stream for the same (seed, offset):
//   element i  ->  chunk c = i / 256, w = i % 256, lane = w / 64, g = w % 64,
//                  Philox counter = offset + 64 * c + g (64-bit, in counter words 0 and 1),
//                  uint32 word = Philox output `lane` of that counter.
// Gaussian: Box-Muller on the word pairs (0, 1) and (2, 3): u1 = (w0 + 1/2) 2^-32 in (0, 1],
//   r = sqrt(-2 log u1), theta = 2 pi w1 2^-32; lane 0 = r cos, lane 1 = r sin (same for 2, 3).
//   Largest |eps| = sqrt(66 log 2) = 6.76 (no truncation at 5.7 as in tl.randn).
// Laplace (scale b = 1): the top bit of the word is the sign, the low 31 bits give
//   v = (m + 1/2) 2^-31 in (0, 1] and |eps| = -log v ~ Exp(1).
// log, sin, cos are branch-free float polynomials (Cephes) so that the loops vectorise; they are
// accurate to a few ulp, which is all noise needs.
//
// sigma is read in place through its broadcast strides (never expanded in memory). The backward
// regenerates eps from (seed, offset) and returns grad_sigma = sum(eps * grad_y) over the
// broadcast dimensions, in sigma's shape.
#include "kernel_common.h"
#include "isa_begin.h"
#include "vmath.h"

namespace {

// threads for a loop of n chunks: torch's setting (omp_get_max_threads()), 1 inside a parallel region
inline int num_threads_for(int64_t n) {
  if (omp_in_parallel()) return 1;
  return (int)std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), n));
}

// broadcast strides of a contiguous sigma of sigma_sizes (nd entries) read with x's sizes
inline std::vector<int64_t> bcast_strides(int nd, const int64_t* sizes, const int64_t* sigma_sizes) {
  std::vector<int64_t> st((size_t)nd, 0);
  int64_t s = 1;
  for (int d = nd - 1; d >= 0; --d) {
    st[(size_t)d] = (sigma_sizes[d] == 1 && sizes[d] != 1) ? 0 : s;
    s *= sigma_sizes[d];
  }
  return st;
}

constexpr int kGroups = 64;             // Philox counters per chunk
constexpr int kChunk = 4 * kGroups;     // elements per chunk (4 words per counter)

// Philox-4x32-10 for kGroups consecutive counters starting at `ctr` (64-bit).
#if FASTGEN_ISA_LEVEL >= 1 || (defined(__x86_64__) && (!defined(FASTGEN_NATIVE_BUILD) || defined(__SSE4_1__)))
// Explicit vectors: Philox needs the high and low halves of 32 x 32 -> 64-bit products, which
// vpmuludq gives for the even lanes; from a plain uint64 loop GCC emits a full 64 x 64-bit
// multiply emulation (3 vpmuludq and shuffles per product) instead. 4 lanes (baseline x86-64:
// SSE4.1), 8 (AVX2) or 16 (AVX-512).
#if FASTGEN_ISA_LEVEL == 2
typedef __m512i PV;
constexpr int kPL = 16;
inline PV p_set1(uint32_t a) { return _mm512_set1_epi32((int)a); }
inline PV p_load(const uint32_t* p) { return _mm512_load_si512((const void*)p); }
inline void p_store(uint32_t* p, PV v) { _mm512_store_si512((void*)p, v); }
inline PV p_xor(PV a, PV b) { return _mm512_xor_si512(a, b); }
inline void p_mulhilo(PV a, PV m, PV& hi, PV& lo) {
  const PV pe = _mm512_mul_epu32(a, m);                         // lanes 0, 2, ...: 64-bit products
  const PV po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);  // lanes 1, 3, ...
  lo = _mm512_mask_blend_epi32((__mmask16)0xAAAA, pe, _mm512_slli_epi64(po, 32));
  hi = _mm512_mask_blend_epi32((__mmask16)0xAAAA, _mm512_srli_epi64(pe, 32), po);
}
#elif FASTGEN_ISA_LEVEL == 0
typedef __m128i PV;
constexpr int kPL = 4;
inline PV p_set1(uint32_t a) { return _mm_set1_epi32((int)a); }
inline PV p_load(const uint32_t* p) { return _mm_load_si128((const __m128i*)p); }
inline void p_store(uint32_t* p, PV v) { _mm_store_si128((__m128i*)p, v); }
inline PV p_xor(PV a, PV b) { return _mm_xor_si128(a, b); }
inline void p_mulhilo(PV a, PV m, PV& hi, PV& lo) {
  const PV pe = _mm_mul_epu32(a, m);
  const PV po = _mm_mul_epu32(_mm_srli_epi64(a, 32), m);
  lo = _mm_blend_epi16(pe, _mm_slli_epi64(po, 32), 0xCC);
  hi = _mm_blend_epi16(_mm_srli_epi64(pe, 32), po, 0xCC);
}
#else
typedef __m256i PV;
constexpr int kPL = 8;
inline PV p_set1(uint32_t a) { return _mm256_set1_epi32((int)a); }
inline PV p_load(const uint32_t* p) { return _mm256_load_si256((const __m256i*)p); }
inline void p_store(uint32_t* p, PV v) { _mm256_store_si256((__m256i*)p, v); }
inline PV p_xor(PV a, PV b) { return _mm256_xor_si256(a, b); }
inline void p_mulhilo(PV a, PV m, PV& hi, PV& lo) {
  const PV pe = _mm256_mul_epu32(a, m);
  const PV po = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
}
#endif
// kPL-lane float / int vectors (GCC vector extensions) for the transforms
typedef float NF __attribute__((vector_size(kPL * 4)));
typedef int32_t NI __attribute__((vector_size(kPL * 4)));
typedef uint32_t NU __attribute__((vector_size(kPL * 4)));

constexpr float kTwoM32 = 2.3283064365386963e-10f;  // 2^-32
constexpr float kTwoM31 = 4.656612873077393e-10f;   // 2^-31

inline NF n_sqrt(NF x) {
#if FASTGEN_ISA_LEVEL == 2
  return (NF)_mm512_sqrt_ps((__m512)x);
#elif FASTGEN_ISA_LEVEL == 0
  return (NF)_mm_sqrt_ps((__m128)x);
#else
  return (NF)_mm256_sqrt_ps((__m256)x);
#endif
}

// uint32 -> float, correctly rounded (AVX2 has no unsigned conversion): hi 2^16 + lo, both exact
inline NF n_u32_to_f(NU w) {
  return __builtin_convertvector((NI)(w >> 16), NF) * 65536.0f + __builtin_convertvector((NI)(w & 0xffffu), NF);
}

// fg_log (vmath.h) on kPL lanes: natural log of normal x > 0, Cephes logf
inline NF n_log(NF x) {
  const NU ix = (NU)x;
  NI e = (NI)((ix >> 23) & 0xffu) - 126;
  NF m = (NF)((ix & 0x007fffffu) | 0x3f000000u);
  const NI small = m < 0.707106781186547524f;  // -1 where true
  e += small;
  m = (small ? m + m : m) - 1.0f;
  const NF z = m * m;
  NF y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const NF fe = __builtin_convertvector(e, NF);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// fg_sincos2pi_u32 (vmath.h) on kPL lanes
inline void n_sincos2pi(NU b, NF& s, NF& c) {
  const NU q = (b + (1u << 29)) >> 30;
  const NI rr = (NI)(b - (q << 30));
  const NF x = __builtin_convertvector(rr, NF) * 1.4629180792671596e-09f;
  const NF z = x * x;
  const NF sp = ((z * -1.9515295891e-4f + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
  const NF cp = ((z * 2.443315711809948e-5f - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                0.5f * z + 1.0f;
  const NI swap = (q & 1u) != 0u;
  const NF sv = swap ? cp : sp;
  const NF cv = swap ? sp : cp;
  s = (NF)((NU)sv ^ ((q & 2u) << 30));
  c = (NF)((NU)cv ^ (((q + 1u) & 2u) << 30));
}

inline void n_store(float* p, NF v) { std::memcpy(p, &v, sizeof(v)); }

// the transform of one counter group: words w0..w3 of kPL counters -> eps at e + l * kGroups
inline void n_transform(int kind, NU w0, NU w1, NU w2, NU w3, float* __restrict e) {
  if (kind == 0) {
    // Box-Muller on the word pairs (0, 1) and (2, 3)
    const NF r0 = n_sqrt(-2.0f * n_log(n_u32_to_f(w0) * kTwoM32 + 0.5f * kTwoM32));
    const NF r1 = n_sqrt(-2.0f * n_log(n_u32_to_f(w2) * kTwoM32 + 0.5f * kTwoM32));
    NF s0, c0, s1, c1;
    n_sincos2pi(w1, s0, c0);
    n_sincos2pi(w3, s1, c1);
    n_store(e, r0 * c0);
    n_store(e + kGroups, r0 * s0);
    n_store(e + 2 * kGroups, r1 * c1);
    n_store(e + 3 * kGroups, r1 * s1);
  } else {
    const NU w[4] = {w0, w1, w2, w3};
    for (int l = 0; l < 4; ++l) {
      const NF v = __builtin_convertvector((NI)(w[l] & 0x7fffffffu), NF) * kTwoM31 + 0.5f * kTwoM31;
      const NF m = -n_log(v);
      n_store(e + l * kGroups, (NF)((NU)m ^ (w[l] & 0x80000000u)));
    }
  }
}

// eps for one chunk (kChunk values, layout above): Philox in registers, then the transform.
inline void noise_chunk(int kind, uint64_t ctr, uint32_t k0_, uint32_t k1_, float* __restrict eps) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
  alignas(64) uint32_t lo[kGroups], hi[kGroups];
  for (int g = 0; g < kGroups; ++g) {
    const uint64_t c = ctr + (uint64_t)g;
    lo[g] = (uint32_t)c;
    hi[g] = (uint32_t)(c >> 32);
  }
  const PV m0 = p_set1(M0), m1 = p_set1(M1);
  // two independent groups of lanes per step: the multiplies of one hide the latency of the other
  for (int g = 0; g < kGroups; g += 2 * kPL) {
    PV a0 = p_load(lo + g), a1 = p_load(hi + g), a2 = p_set1(0), a3 = p_set1(0);
    PV b0 = p_load(lo + g + kPL), b1 = p_load(hi + g + kPL), b2 = p_set1(0), b3 = p_set1(0);
    uint32_t k0 = k0_, k1 = k1_;
    for (int r = 0; r < 10; ++r) {
      const PV rk0 = p_set1(k0), rk1 = p_set1(k1);
      PV ha, la, hb, lb, hc, lc, hd, ld;
      p_mulhilo(a0, m0, ha, la);
      p_mulhilo(a2, m1, hb, lb);
      p_mulhilo(b0, m0, hc, lc);
      p_mulhilo(b2, m1, hd, ld);
      a0 = p_xor(p_xor(hb, a1), rk0);
      a2 = p_xor(p_xor(ha, a3), rk1);
      a1 = lb;
      a3 = la;
      b0 = p_xor(p_xor(hd, b1), rk0);
      b2 = p_xor(p_xor(hc, b3), rk1);
      b1 = ld;
      b3 = lc;
      k0 += W0;
      k1 += W1;
    }
    n_transform(kind, (NU)a0, (NU)a1, (NU)a2, (NU)a3, eps + g);
    n_transform(kind, (NU)b0, (NU)b1, (NU)b2, (NU)b3, eps + g + kPL);
  }
}
#else
inline void philox_chunk(uint64_t ctr, uint32_t k0_, uint32_t k1_, uint32_t* __restrict o0,
                         uint32_t* __restrict o1, uint32_t* __restrict o2, uint32_t* __restrict o3) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#pragma omp simd
  for (int g = 0; g < kGroups; ++g) {
    uint64_t c = ctr + (uint64_t)g;
    uint32_t c0 = (uint32_t)c, c1 = (uint32_t)(c >> 32), c2 = 0u, c3 = 0u;
    uint32_t k0 = k0_, k1 = k1_;
    for (int r = 0; r < 10; ++r) {
      uint64_t p0 = (uint64_t)M0 * c0;
      uint64_t p1 = (uint64_t)M1 * c2;
      uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
      uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
      c1 = (uint32_t)p1;
      c3 = (uint32_t)p0;
      c0 = n0;
      c2 = n2;
      k0 += W0;
      k1 += W1;
    }
    o0[g] = c0;
    o1[g] = c1;
    o2[g] = c2;
    o3[g] = c3;
  }
}

constexpr float kTwoM32 = 2.3283064365386963e-10f;  // 2^-32
constexpr float kTwoM31 = 4.656612873077393e-10f;   // 2^-31

// eps for one chunk (kChunk values, layout above).
inline void noise_chunk(int kind, uint64_t ctr, uint32_t k0, uint32_t k1, float* __restrict eps) {
  alignas(64) uint32_t o[4][kGroups];
  philox_chunk(ctr, k0, k1, o[0], o[1], o[2], o[3]);
  if (kind == 0) {
    for (int pr = 0; pr < 2; ++pr) {
      const uint32_t* a = o[2 * pr];
      const uint32_t* b = o[2 * pr + 1];
      float* e0 = eps + (2 * pr) * kGroups;
      float* e1 = eps + (2 * pr + 1) * kGroups;
#pragma omp simd
      for (int g = 0; g < kGroups; ++g) {
        float u1 = (float)a[g] * kTwoM32 + 0.5f * kTwoM32;  // (0, 1]
        float r = fg_sqrt(-2.0f * fg_log(u1));
        float s, c;
        fg_sincos2pi_u32(b[g], s, c);
        e0[g] = r * c;
        e1[g] = r * s;
      }
    }
  } else {
    for (int l = 0; l < 4; ++l) {
      const uint32_t* a = o[l];
      float* e = eps + l * kGroups;
#pragma omp simd
      for (int g = 0; g < kGroups; ++g) {
        uint32_t w = a[g];
        float v = (float)(w & 0x7fffffffu) * kTwoM31 + 0.5f * kTwoM31;  // (0, 1]
        float m = -fg_log(v);
        e[g] = bitcast<float>(bitcast<uint32_t>(m) ^ (w & 0x80000000u));
      }
    }
  }
}
#endif

// Offsets of a broadcast operand for consecutive flat indices of a contiguous tensor of `sizes`.
// Dimensions are collapsed where possible; the innermost run is handled in a tight loop.
struct Bcast {
  std::vector<int64_t> size, stride;  // collapsed, outermost first

  Bcast(int nd, const int64_t* sizes, const int64_t* strides) {
    for (int d = 0; d < nd; ++d) {
      int64_t n = sizes[d], st = n == 1 ? 0 : strides[d];
      if (n == 1) continue;
      if (!size.empty() && stride.back() == st * n) {  // merge with the previous (outer) dim
        size.back() *= n;
        stride.back() = st;
      } else {
        size.push_back(n);
        stride.push_back(st);
      }
    }
    if (size.empty()) {
      size.push_back(1);
      stride.push_back(0);
    }
  }

  // Calls f(j0, len, off, st): elements [i0 + j0, i0 + j0 + len) have operand offsets off + k st.
  template <typename F>
  void for_runs(int64_t i0, int64_t n, F f) const {
    const int nd = (int)size.size();
    int64_t idx[16];
    int64_t rem = i0, off = 0;
    for (int d = nd - 1; d >= 0; --d) {
      idx[d] = rem % size[d];
      rem /= size[d];
      off += idx[d] * stride[d];
    }
    const int64_t ni = size[nd - 1], si = stride[nd - 1];
    int64_t j = 0;
    while (j < n) {
      int64_t len = std::min(ni - idx[nd - 1], n - j);
      f(j, len, off, si);
      j += len;
      // advance the multi-index by len along the innermost dim, carrying outward
      off += len * si;
      idx[nd - 1] += len;
      for (int d = nd - 1; d > 0 && idx[d] == size[d]; --d) {
        off -= size[d] * stride[d];
        idx[d] = 0;
        idx[d - 1] += 1;
        off += stride[d - 1];
      }
    }
  }
};

inline void split_seed(int64_t seed, uint32_t& k0, uint32_t& k1) {
  uint64_t s = (uint64_t)seed;
  k0 = (uint32_t)s;
  k1 = (uint32_t)(s >> 32);
}

template <typename scalar_t, typename acc_t>
void noise_fwd_impl(const scalar_t* __restrict x, scalar_t* __restrict y, const acc_t* sigma,
                    const Bcast& bc, bool scalar_sigma, int64_t numel, int kind, int64_t seed,
                    int64_t offset) {
  uint32_t k0, k1;
  split_seed(seed, k0, k1);
  const int64_t nchunks = (numel + kChunk - 1) / kChunk;
  const acc_t s0 = sigma[0];
#pragma omp parallel num_threads(num_threads_for(nchunks)) if (nchunks > 16)
  {
    alignas(64) float eps[kChunk];
    alignas(64) acc_t sig[kChunk];
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      noise_chunk(kind, (uint64_t)offset + (uint64_t)(c * kGroups), k0, k1, eps);
      const int64_t i0 = c * kChunk;
      const int64_t n = std::min<int64_t>(kChunk, numel - i0);
      const scalar_t* xs = x + i0;
      scalar_t* ys = y + i0;
      if (scalar_sigma) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ys[j] = (scalar_t)((acc_t)xs[j] + s0 * (acc_t)eps[j]);
      } else {
        bc.for_runs(i0, n, [&](int64_t j0, int64_t len, int64_t off, int64_t st) {
          if (st == 0) {
            for (int64_t k = 0; k < len; ++k) sig[j0 + k] = sigma[off];
          } else {
            for (int64_t k = 0; k < len; ++k) sig[j0 + k] = sigma[off + k * st];
          }
        });
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) ys[j] = (scalar_t)((acc_t)xs[j] + sig[j] * (acc_t)eps[j]);
      }
    }
  }
}

// grad_sigma[k] = sum over elements i with sigma-offset k of eps_i * g_i (accumulated in double).
template <typename scalar_t>
void noise_grad_impl(const scalar_t* __restrict g, double* out, int64_t out_numel, const Bcast& bc,
                     int64_t numel, int kind, int64_t seed, int64_t offset) {
  uint32_t k0, k1;
  split_seed(seed, k0, k1);
  const int64_t nchunks = (numel + kChunk - 1) / kChunk;
  const bool full = out_numel == numel;  // no broadcast: out[i] = eps_i g_i
  const int nt = nchunks > 16 ? num_threads_for(nchunks) : 1;
  std::vector<double> acc(full ? 0 : (size_t)nt * (size_t)out_numel, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    alignas(64) float eps[kChunk];
    double* a = full ? nullptr : acc.data() + (size_t)omp_get_thread_num() * (size_t)out_numel;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < nchunks; ++c) {
      noise_chunk(kind, (uint64_t)offset + (uint64_t)(c * kGroups), k0, k1, eps);
      const int64_t i0 = c * kChunk;
      const int64_t n = std::min<int64_t>(kChunk, numel - i0);
      const scalar_t* gs = g + i0;
      if (full) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) out[i0 + j] = (double)eps[j] * (double)gs[j];
      } else if (out_numel == 1) {
        double s = 0.0;
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < n; ++j) s += (double)((float)gs[j] * eps[j]);
        a[0] += s;
      } else {
        bc.for_runs(i0, n, [&](int64_t j0, int64_t len, int64_t off, int64_t st) {
          if (st == 0) {
            double s = 0.0;
            for (int64_t k = 0; k < len; ++k) s += (double)eps[j0 + k] * (double)gs[j0 + k];
            a[off] += s;
          } else {
            for (int64_t k = 0; k < len; ++k) a[off + k * st] += (double)eps[j0 + k] * (double)gs[j0 + k];
          }
        });
      }
    }
  }
  if (!full) {
    for (int64_t k = 0; k < out_numel; ++k) {
      double s = 0.0;
      for (int t = 0; t < nt; ++t) s += acc[(size_t)t * (size_t)out_numel + (size_t)k];
      out[k] = s;
    }
  }
}

template <typename scalar_t>
void fwd_typed(const void* x, void* y, const void* sigma, int nd, const int64_t* sizes, const int64_t* sigma_sizes,
               int64_t numel, int kind, int64_t seed, int64_t offset) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const bool scalar_sigma = sigma_sizes == nullptr;
  std::vector<int64_t> st = scalar_sigma ? std::vector<int64_t>((size_t)nd, 0) : bcast_strides(nd, sizes, sigma_sizes);
  Bcast bc(nd, sizes, st.data());
  noise_fwd_impl<scalar_t, acc_t>(static_cast<const scalar_t*>(x), static_cast<scalar_t*>(y),
                                  static_cast<const acc_t*>(sigma), bc, scalar_sigma, numel, kind, seed, offset);
}

template <typename scalar_t>
void grad_typed(const void* g, double* out, int nd, const int64_t* sizes, const int64_t* sigma_sizes, int64_t numel,
                int kind, int64_t seed, int64_t offset) {
  int64_t out_numel = 1;
  if (sigma_sizes)
    for (int d = 0; d < nd; ++d) out_numel *= sigma_sizes[d];
  std::vector<int64_t> st =
      sigma_sizes == nullptr ? std::vector<int64_t>((size_t)nd, 0) : bcast_strides(nd, sizes, sigma_sizes);
  Bcast bc(nd, sizes, st.data());
  noise_grad_impl<scalar_t>(static_cast<const scalar_t*>(g), out, out_numel, bc, numel, kind, seed, offset);
}

}  // namespace

void spread_noise(DType dt, const void* x, void* y, const void* sigma, int nd, const int64_t* sizes,
                  const int64_t* sigma_sizes, int64_t numel, int kind, int64_t seed, int64_t offset) {
  if (numel == 0) return;
  switch (dt) {
    case DType::kFloat32: fwd_typed<float>(x, y, sigma, nd, sizes, sigma_sizes, numel, kind, seed, offset); break;
    case DType::kFloat64: fwd_typed<double>(x, y, sigma, nd, sizes, sigma_sizes, numel, kind, seed, offset); break;
    case DType::kFloat16: fwd_typed<Half>(x, y, sigma, nd, sizes, sigma_sizes, numel, kind, seed, offset); break;
    case DType::kBFloat16: fwd_typed<BFloat16>(x, y, sigma, nd, sizes, sigma_sizes, numel, kind, seed, offset); break;
  }
}

void spread_noise_grad_sigma(DType dt, const void* grad_y, double* out, int nd, const int64_t* sizes,
                             const int64_t* sigma_sizes, int64_t numel, int kind, int64_t seed, int64_t offset) {
  if (numel == 0) {
    int64_t n = 1;
    if (sigma_sizes)
      for (int d = 0; d < nd; ++d) n *= sigma_sizes[d];
    std::fill(out, out + n, 0.0);
    return;
  }
  switch (dt) {
    case DType::kFloat32: grad_typed<float>(grad_y, out, nd, sizes, sigma_sizes, numel, kind, seed, offset); break;
    case DType::kFloat64: grad_typed<double>(grad_y, out, nd, sizes, sigma_sizes, numel, kind, seed, offset); break;
    case DType::kFloat16: grad_typed<Half>(grad_y, out, nd, sizes, sigma_sizes, numel, kind, seed, offset); break;
    case DType::kBFloat16: grad_typed<BFloat16>(grad_y, out, nd, sizes, sigma_sizes, numel, kind, seed, offset); break;
  }
}

#include "isa_end.h"
