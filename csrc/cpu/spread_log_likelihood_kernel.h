// spread_log_likelihood on CPU: fused forward and backward, OpenMP: the compute code, compiled once
// per instruction set (csrc/cpu/isa/spread_log_likelihood_<isa>.cpp, see isa_begin.h). The tensor
// boundary is csrc/cpu/spread_log_likelihood.cpp.
//
//   out[n] = log( 1/S sum_s K_sigma(y_n - x_s) ),  y [N, D], x = samples [S, D]
//   Gaussian (std sigma_j):  log K = -1/2 sum_j d_j^2 / sigma_j^2 - sum_j log sigma_j - D/2 log(2 pi)
//   Laplace (scale b_j):     log K = -sum_j |d_j| / b_j - sum_j log(2 b_j)
//
// Exactness: every pairwise term is computed from direct differences d = y_nj - x_sj (exact to
// rounding of d, whatever the offset of the data), never from the ||y||^2 - 2 y.x + ||x||^2
// expansion, which loses ~130 nats on data offset by 1e3.
// Memory: O((N + S) D). The samples are packed once into tiles of L = 16 samples x D (lanes =
// samples, so the inner loop is a broadcast of y_nj against 16 samples: sub + fma, no horizontal
// sums); the logsumexp over samples is online (flash-style): per block of SB samples a block max
// and a rescaled sum, so no N x S matrix is ever formed.
// Backward recomputes the pairwise terms and accumulates, with t_ns = g_n exp(a_ns - lse_n):
//   Gaussian: grad_y_nj = -1/s_j^2 sum_s t d,  grad_x_sj = 1/s_j^2 sum_n t d,
//             grad_s_j  = -G / s_j + 1/s_j^3 sum_ns t d^2            (G = sum_n g_n)
//   Laplace:  d -> sign(d) in the first two, grad_b_j = -G / b_j + 1/b_j^2 sum_ns t |d|.
// A one-element sigma gets the sum of the per-dimension terms.
#include "kernel_common.h"
#include "isa_begin.h"
#include "vmath.h"

namespace {

// torch's thread setting (omp_get_max_threads()); 1 inside a parallel region
inline int num_threads() { return omp_in_parallel() ? 1 : std::max(1, omp_get_max_threads()); }

constexpr int R = 4;     // y rows per micro-tile (backward)
// Forward micro-tile rows: as many accumulators as the registers hold, so that the FMA latency
// (4 cycles, 2 per cycle) is covered: L = 16 lanes are 1 zmm (AVX-512: 4 rows; measured on Zen 5,
// 1 thread, 1024 x 16384 x 64: 4 rows 42 ms, 8 rows 44 ms, 12 rows 70 ms),
// 2 ymm (AVX2: 6 rows, 12 accumulators + 2 sample vectors + broadcast + difference = 16 ymm),
// 4 xmm (SSE: 2 rows, 8 accumulators).
// double: half the rows (a row is twice the registers).
#if FASTGEN_ISA_LEVEL == 2
constexpr int RF_FLOAT = 4;
#elif FASTGEN_ISA_LEVEL == 1
constexpr int RF_FLOAT = 6;
#else
constexpr int RF_FLOAT = 2;
#endif
template <typename T>
constexpr int RF = sizeof(T) == 4 ? RF_FLOAT : (RF_FLOAT / 2 > 0 ? RF_FLOAT / 2 : 1);
template <typename T>
constexpr int RBF = RF<T> * (32 / RF<T>);  // forward rows per block (one parallel task)
constexpr int L = 16;    // samples per micro-tile (SIMD lanes)
constexpr int RB = 32;   // y rows per block (one parallel task)
constexpr int SB = 256;  // samples per block (packed block stays in L2)

inline float fg_exp(float x) { return fg_exp_neg(x); }
inline double fg_exp(double x) { return std::exp(x); }

// |v| by bit operations (vectorises without -fno-trapping-math).
inline float fg_abs(float v) { return bitcast<float>(bitcast<uint32_t>(v) & 0x7fffffffu); }
inline double fg_abs(double v) { return bitcast<double>(bitcast<uint64_t>(v) & 0x7fffffffffffffffull); }

// GCC / Clang vector extensions: one value per sample lane (L lanes). Used where the loops
// must stay in registers (the backward pass); lowered to AVX-512, AVX2 or SSE as available.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(sizeof(T) * L)));
};
template <typename T>
struct IVec {
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
};
// unaligned load / store of a vector VV (default: one 16-lane tile row) of T
template <typename T, typename VV = typename Vec<T>::type>
inline VV vload(const T* p) {
  VV v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, typename VV>
inline void vstore(T* p, VV v) {
  std::memcpy(p, &v, sizeof(v));
}
// sign(d) with sign(0) = 0, lane-wise, for any vector VV of T
template <typename T, typename VV>
inline VV vsign_any(VV d) {
  using I = typename IVec<T>::I;
  using U = std::make_unsigned_t<I>;
  typedef I VI __attribute__((vector_size(sizeof(VV))));
  typedef U VU __attribute__((vector_size(sizeof(VV))));
  const I sbit = (I)((U)1 << (sizeof(I) * 8 - 1));
  const I one = sizeof(T) == 4 ? (I)0x3f800000 : (I)0x3ff0000000000000LL;
  VI b = (VI)d;
  // nonzero mask without a compare (GCC 12 scalarises compares of vectors wider than the
  // registers on AVX2): |d| bits + (2^(bits-1) - 1) sets the sign bit iff |d| != 0; an
  // arithmetic shift spreads it.
  const VU a = (VU)b & (U)(~sbit);
  const VI nz = (VI)(a + (U)(~sbit)) >> (int)(sizeof(I) * 8 - 1);
  VI r = ((b & sbit) | one) & nz;
  return (VV)r;
}
// One native register of T (AVX-512: 64 bytes, AVX2: 32, SSE: 16): the backward's second pass
// runs on these, a 16-lane tile being 1 / 2 / 4 registers (on AVX2, 64-byte vectors made GCC
// spill the accumulators: the pass ran 2.4x slower than on AVX-512).
constexpr int NB = FASTGEN_ISA_LEVEL == 2 ? 64 : FASTGEN_ISA_LEVEL == 1 ? 32 : 16;
template <typename T>
struct NVec {
  typedef T type __attribute__((vector_size(NB)));
  static constexpr int lanes = NB / (int)sizeof(T);
};
inline Vec<double>::type vexp_neg(Vec<double>::type x) {
  for (int l = 0; l < L; ++l) x[l] = std::exp(x[l]);
  return x;
}

// Pack samples [S, D] into [ntiles][D][L] (zero padded).
template <typename T>
void pack_samples(const T* x, int64_t S, int64_t D, T* packed) {
  const int64_t ntiles = (S + L - 1) / L;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (ntiles > 16)
  for (int64_t t = 0; t < ntiles; ++t) {
    {
      T* p = packed + t * D * L;
      for (int l = 0; l < L; ++l) {
        const int64_t s = t * L + l;
        if (s < S) {
          const T* xs = x + s * D;
          for (int64_t j = 0; j < D; ++j) p[j * L + l] = xs[j];
        } else {
          for (int64_t j = 0; j < D; ++j) p[j * L + l] = T(0);
        }
      }
    }
  }
}

// Pack samples [S, D] into [nblocks][D][SB / L][L] (zero padded): per sample block, one
// dimension's values of all its tiles are contiguous, so the backward's loop over tiles at fixed
// j walks memory linearly (the tile layout strides by D * L * 4 bytes = 4 KiB for D = 64, which
// maps every access of that loop to one L1 set).
template <typename T>
void pack_samples_blocks(const T* x, int64_t S, int64_t D, T* packed) {
  constexpr int NT = SB / L;
  const int64_t nb = (S + SB - 1) / SB;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (nb > 1)
  for (int64_t b = 0; b < nb; ++b) {
    {
      T* p = packed + b * D * SB;
      for (int t = 0; t < NT; ++t)
        for (int l = 0; l < L; ++l) {
          const int64_t s = b * SB + t * L + l;
          const T* xs = x + s * D;
          for (int64_t j = 0; j < D; ++j) p[(j * NT + t) * L + l] = s < S ? xs[j] : T(0);
        }
    }
  }
}

// acc[r][l] = sum_j f(w_j (y_rj - x_lj)), f = square (Gaussian) or abs (Laplace), NR rows.
template <typename T, int KIND, bool PERDIM, int NR>
inline void micro(const T* const* yr, const T* __restrict xp, const T* __restrict w, int64_t D,
                  T (&acc)[NR][L]) {
  T a[NR][L];
  for (int r = 0; r < NR; ++r)
    for (int l = 0; l < L; ++l) a[r][l] = T(0);
  for (int64_t j = 0; j < D; ++j) {
    const T* __restrict xj = xp + j * L;
    const T wj = PERDIM ? w[j] : T(1);
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      const T yv = yr[r][j];
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        T d = yv - xj[l];
        if (PERDIM) d *= wj;
        a[r][l] += KIND == 0 ? d * d : fg_abs(d);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int l = 0; l < L; ++l) acc[r][l] = a[r][l];
}

template <typename T>
struct Problem {
  const T* y;
  const T* xp;  // packed samples [ntiles][D][L]
  const T* xq;  // packed samples [nblocks][D][SB / L][L] (backward only)
  int64_t N, S, D;
  const T* w;   // per-dimension weights (PERDIM), see make_weights
  T scale;      // a_ns = -scale * acc
};

// max of o[0..n) and sum of exp(o[k] - m) over a block of one row. float: explicit 16-lane vectors
// (vexp_neg, always inlined): the scalar loop is not vectorised by GCC for AVX2 (no unsigned
// vector compare for the clamp), and as a scalar loop it took half of the forward's time there.
template <typename T>
inline T block_max(const T* o, int n) {
  T bm = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : bm)
  for (int k = 0; k < n; ++k) bm = o[k] > bm ? o[k] : bm;
  return bm;
}
template <>
inline float block_max<float>(const float* o, int n) {
  vf vm = splat(-std::numeric_limits<float>::infinity());  // native width (a 64-byte select is
  int k = 0;                                                // scalarised on AVX2)
  for (; k + W <= n; k += W) {
    vf v;
    std::memcpy(&v, o + k, sizeof(v));
    vm = sel(v > vm, v, vm);
  }
  float bm = -std::numeric_limits<float>::infinity();
  for (int l = 0; l < W; ++l) bm = vm[l] > bm ? vm[l] : bm;
  for (; k < n; ++k) bm = o[k] > bm ? o[k] : bm;
  return bm;
}
template <typename T>
inline T block_expsum(const T* o, int n, T m) {
  T bs = T(0);
#pragma omp simd reduction(+ : bs)
  for (int k = 0; k < n; ++k) bs += fg_exp(o[k] - m);
  return bs;
}
template <>
inline float block_expsum<float>(const float* o, int n, float m) {
  vf acc = {};  // native width (16-lane vectors went through the stack on AVX2: 1/3 of the forward)
  int k = 0;
  for (; k + W <= n; k += W) {
    vf v;
    std::memcpy(&v, o + k, sizeof(v));
    acc += vexp_neg_w(v - m);
  }
  float bs = 0.0f;
  for (int l = 0; l < W; ++l) bs += acc[l];
  for (; k < n; ++k) bs += fg_exp(o[k] - m);
  return bs;
}

// lse[n] = logsumexp_s a_ns (without the normalising constant).
template <typename T, int KIND, bool PERDIM>
void forward_impl(const Problem<T>& p, double* lse) {
  const int64_t nblocks = (p.N + RBF<T> - 1) / RBF<T>;
#pragma omp parallel num_threads(num_threads()) if (nblocks > 1)
  {
    std::vector<T> buf((size_t)RBF<T> * SB);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t n0 = b * RBF<T>;
      const int nr = (int)std::min<int64_t>(RBF<T>, p.N - n0);
      T m[RBF<T>];
      double ssum[RBF<T>];
      for (int r = 0; r < RBF<T>; ++r) {
        m[r] = -std::numeric_limits<T>::infinity();
        ssum[r] = 0.0;
      }
      for (int64_t s0 = 0; s0 < p.S; s0 += SB) {
        const int ns = (int)std::min<int64_t>(SB, p.S - s0);
        const int nt = (ns + L - 1) / L;
        for (int rg = 0; rg < nr; rg += RF<T>) {
          const T* yr[RF<T>];
          for (int r = 0; r < RF<T>; ++r) yr[r] = p.y + std::min<int64_t>(n0 + rg + r, p.N - 1) * p.D;
          for (int t = 0; t < nt; ++t) {
            T acc[RF<T>][L];
            micro<T, KIND, PERDIM, RF<T>>(yr, p.xp + (s0 / L + t) * p.D * L, p.w, p.D, acc);
            for (int r = 0; r < RF<T> && rg + r < nr; ++r) {
              T* o = buf.data() + (size_t)(rg + r) * SB + t * L;
#pragma omp simd
              for (int l = 0; l < L; ++l) o[l] = -p.scale * acc[r][l];
            }
          }
        }
        for (int r = 0; r < nr; ++r) {
          const T* o = buf.data() + (size_t)r * SB;
          const T bm = block_max(o, ns);
          if (bm > m[r]) {
            if (ssum[r] > 0.0) ssum[r] *= std::exp((double)m[r] - (double)bm);
            m[r] = bm;
          }
          if (m[r] == -std::numeric_limits<T>::infinity()) continue;  // every term underflowed so far
          ssum[r] += (double)block_expsum(o, ns, m[r]);
        }
      }
      for (int r = 0; r < nr; ++r) lse[n0 + r] = (double)m[r] + std::log(ssum[r]);
    }
  }
}

// Backward. gy [N, D] (or null), gxp per-thread packed [nthreads][nblocks][D][SB / L][L] (or null),
// gsum per-thread [nthreads][D] double: sum_ns t f(d_j) with f = d^2 or |d| (raw d, not weighted).
// Per (R rows, sample block): pass 1 recomputes the weights t for every tile of the block; pass 2
// runs over dimensions j, then tiles, then rows, so that the row sums (grad_y) stay in registers
// across the block and each packed grad_x vector is read and written once per (tile, j).
template <typename T, int KIND, bool PERDIM>
void backward_impl(const Problem<T>& p, const T* g, const double* lse, const T* fy /* per-dim factor */,
                   T* gy, T* gxp, double* gsum, bool need_sigma) {
  constexpr int NT = SB / L;  // tiles per sample block
  const int64_t nblocks = (p.N + RB - 1) / RB;
  const int64_t D = p.D;
  const int64_t sblocks = (p.S + SB - 1) / SB;
  const bool need_y = gy != nullptr;
#pragma omp parallel num_threads(num_threads()) if (nblocks > 1)
  {
    const int tid = omp_get_thread_num();
    T* gx = gxp ? gxp + (size_t)tid * sblocks * D * SB : nullptr;
    double* gs = gsum + (size_t)tid * D;
    std::vector<T> gyrow((size_t)RB * D);  // per-row totals for the block
    using V = typename Vec<T>::type;
    V tw[NT][R];                            // weights of the current rows x sample block
#pragma omp for schedule(static)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t n0 = b * RB;
      const int nr = (int)std::min<int64_t>(RB, p.N - n0);
      std::fill(gyrow.begin(), gyrow.end(), T(0));
      for (int64_t s0 = 0; s0 < p.S; s0 += SB) {
        const int ns = (int)std::min<int64_t>(SB, p.S - s0);
        const int nt = (ns + L - 1) / L;
        const T* xblk = p.xp + (s0 / L) * D * L;      // tile layout (pass 1)
        const T* xqb = p.xq + (s0 / SB) * D * SB;     // block layout (pass 2)
        T* gxblk = gx ? gx + (s0 / SB) * D * SB : nullptr;
        for (int rg = 0; rg < nr; rg += R) {
          const T* yr[R];
          T gr[R], lr[R];
          for (int r = 0; r < R; ++r) {
            const bool valid = rg + r < nr;
            const int64_t n = std::min<int64_t>(n0 + rg + r, p.N - 1);
            yr[r] = p.y + n * D;
            gr[r] = valid ? g[n] : T(0);
            lr[r] = (T)lse[n];
          }
          // pass 1: t = g_n exp(a_ns - lse_n), 0 for padded samples and rows
          for (int t = 0; t < nt; ++t) {
            T acc[R][L];
            micro<T, KIND, PERDIM, R>(yr, xblk + t * D * L, p.w, D, acc);
            const int nvalid = std::min(L, ns - t * L);
            for (int r = 0; r < R; ++r) {
              if constexpr (std::is_same_v<T, float>) {  // native width (see block_expsum)
                float* tr = reinterpret_cast<float*>(&tw[t][r]);
                for (int h = 0; h < L; h += (int)W) {
                  vf a;
                  std::memcpy(&a, &acc[r][h], sizeof(a));
                  const vf e = vexp_neg_w(a * (-p.scale) - lr[r]) * gr[r];
                  std::memcpy(tr + h, &e, sizeof(e));
                }
                for (int l = nvalid; l < L; ++l) tr[l] = 0.0f;
              } else {
                V e = vexp_neg(vload(&acc[r][0]) * (-p.scale) - lr[r]) * gr[r];
                if (nvalid < L)
                  for (int l = nvalid; l < L; ++l) e[l] = T(0);
                tw[t][r] = e;
              }
            }
          }
          // pass 2, on native registers (NL lanes, L / NL per tile)
          using N = typename NVec<T>::type;
          constexpr int NL = NVec<T>::lanes;
          for (int64_t j = 0; j < D; ++j) {
            // independent accumulators per row: no loop-carried chain longer than one add
            N gya[R] = {}, ssa[R] = {};
            const T yv[R] = {yr[0][j], yr[1][j], yr[2][j], yr[3][j]};
            const T* xqj = xqb + j * SB;
            T* gxj = gxblk ? gxblk + j * SB : nullptr;
            for (int t = 0; t < nt; ++t) {
              for (int h = 0; h < L / NL; ++h) {
                const N xv = vload<T, N>(xqj + t * L + h * NL);
                N u[R];
                for (int r = 0; r < R; ++r) {
                  const N d = yv[r] - xv;
                  const N w = vload<T, N>(reinterpret_cast<const T*>(&tw[t][r]) + h * NL);
                  u[r] = w * (KIND == 0 ? d : vsign_any<T, N>(d));
                  if (need_y) gya[r] += u[r];        // (loop-invariant flags: unswitched)
                  if (need_sigma) ssa[r] += u[r] * d;
                }
                if (gxj) {
                  T* gp = gxj + t * L + h * NL;
                  vstore(gp, vload<T, N>(gp) + ((u[0] + u[1]) + (u[2] + u[3])));
                }
              }
            }
            if (need_y)
              for (int r = 0; r < R && rg + r < nr; ++r) {
                T sum = T(0);
                for (int l = 0; l < NL; ++l) sum += gya[r][l];
                gyrow[(size_t)(rg + r) * D + j] += sum;
              }
            if (need_sigma) {
              const N ss = (ssa[0] + ssa[1]) + (ssa[2] + ssa[3]);
              double sum = 0.0;
              for (int l = 0; l < NL; ++l) sum += (double)ss[l];
              gs[j] += sum;
            }
          }
        }
      }
      if (gy)
        for (int r = 0; r < nr; ++r)
          for (int64_t j = 0; j < D; ++j) gy[(n0 + r) * D + j] = -fy[j] * gyrow[(size_t)r * D + j];
    }
  }
}

// Per-dimension weights and constants of the kernel from sigma (1 or D elements).
template <typename T>
struct Prepared {
  std::vector<T> w;    // per-dim weights for the micro-kernel (PERDIM), else {1}
  double scale;        // a = -scale * acc
  double logc;         // normalising constant of log K, without -log S
  std::vector<T> inv;  // per-dim 1/s (Laplace) or 1/s^2 (Gaussian): the factor of grad_y / grad_x
  std::vector<double> s;  // sigma in double
  bool perdim;
};

template <typename T>
Prepared<T> prepare(const T* sigma, int64_t sigma_numel, int64_t D, int kind) {
  Prepared<T> pr;
  pr.s.assign(sigma, sigma + sigma_numel);
  pr.perdim = sigma_numel > 1;
  const double log2pi = std::log(2.0 * M_PI);
  pr.inv.resize((size_t)D);
  if (!pr.perdim) {
    const double sg = pr.s[0];
    pr.scale = kind == 0 ? 0.5 / (sg * sg) : 1.0 / sg;
    pr.logc = kind == 0 ? -(double)D * (std::log(sg) + 0.5 * log2pi) : -(double)D * std::log(2.0 * sg);
    pr.w.assign(1, T(1));
    std::fill(pr.inv.begin(), pr.inv.end(), (T)(kind == 0 ? 1.0 / (sg * sg) : 1.0 / sg));
  } else {
    pr.w.resize((size_t)D);
    pr.scale = 1.0;
    double lc = 0.0;
    for (int64_t j = 0; j < D; ++j) {
      const double sj = pr.s[(size_t)j];
      pr.w[(size_t)j] = (T)(kind == 0 ? std::sqrt(0.5) / sj : 1.0 / sj);
      pr.inv[(size_t)j] = (T)(kind == 0 ? 1.0 / (sj * sj) : 1.0 / sj);
      lc += kind == 0 ? -(std::log(sj) + 0.5 * log2pi) : -std::log(2.0 * sj);
    }
    pr.logc = lc;
  }
  return pr;
}

template <typename F>
void dispatch_kind(int kind, bool perdim, F f) {
  if (kind == 0) {
    if (perdim) f(std::integral_constant<int, 0>{}, std::true_type{});
    else f(std::integral_constant<int, 0>{}, std::false_type{});
  } else {
    if (perdim) f(std::integral_constant<int, 1>{}, std::true_type{});
    else f(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

template <typename T>
struct AlignedBuf {
  T* p = nullptr;
  explicit AlignedBuf(size_t n) {
    p = static_cast<T*>(std::aligned_alloc(64, ((std::max<size_t>(n, 1) * sizeof(T) + 63) / 64) * 64));
    if (!p) throw std::bad_alloc();
  }
  ~AlignedBuf() { std::free(p); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

template <typename T>
void forward_typed(const T* y, const T* samples, const T* sigma, int64_t sigma_numel, int kind, int64_t N, int64_t S,
                   int64_t D, T* out) {
  const Prepared<T> pr = prepare(sigma, sigma_numel, D, kind);
  AlignedBuf<T> xp((size_t)((S + L - 1) / L * D * L));
  pack_samples<T>(samples, S, D, xp.p);
  std::vector<double> lse((size_t)N);
  Problem<T> p{y, xp.p, nullptr, N, S, D, pr.w.data(), (T)pr.scale};
  dispatch_kind(kind, pr.perdim, [&](auto K, auto PD) {
    forward_impl<T, decltype(K)::value, decltype(PD)::value>(p, lse.data());
  });
  const double c = pr.logc - std::log((double)S);
  for (int64_t n = 0; n < N; ++n) out[n] = (T)(lse[(size_t)n] + c);
}

template <typename T>
void backward_typed(const T* g, const T* y, const T* samples, const T* sigma, int64_t sigma_numel, const T* out,
                    int kind, int64_t N, int64_t S, int64_t D, T* gy, T* gx, T* gsig) {
  const Prepared<T> pr = prepare(sigma, sigma_numel, D, kind);
  // lse without constants: out - logc + log S
  const double c = pr.logc - std::log((double)S);
  std::vector<double> lse((size_t)N);
  for (int64_t n = 0; n < N; ++n) lse[(size_t)n] = (double)out[n] - c;
  const int nth = num_threads();
  const int64_t ntiles = (S + L - 1) / L;
  const int64_t sblocks = (S + SB - 1) / SB;
  std::vector<double> gsum((size_t)nth * (size_t)D, 0.0);
  AlignedBuf<T> xp((size_t)(ntiles * D * L));
  pack_samples<T>(samples, S, D, xp.p);
  AlignedBuf<T> xq((size_t)(sblocks * D * SB));
  pack_samples_blocks<T>(samples, S, D, xq.p);
  Problem<T> p{y, xp.p, xq.p, N, S, D, pr.w.data(), (T)pr.scale};
  std::vector<T> gxp;
  if (gx) gxp.assign((size_t)nth * (size_t)(sblocks * D * SB), T(0));
  dispatch_kind(kind, pr.perdim, [&](auto K, auto PD) {
    backward_impl<T, decltype(K)::value, decltype(PD)::value>(p, g, lse.data(), pr.inv.data(), gy,
                                                              gx ? gxp.data() : nullptr, gsum.data(),
                                                              gsig != nullptr);
  });
  if (gx) {
    // sum over threads, unpack [sblocks][D][SB] -> [S, D], times the per-dim factor
    const size_t per = (size_t)(sblocks * D * SB);
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (S * D > 65536)
    for (int64_t s = 0; s < S; ++s) {
      const int64_t b = s / SB, l = s % SB;
      for (int64_t j = 0; j < D; ++j) {
        const size_t idx = (size_t)((b * D + j) * SB + l);
        T tot = gxp[idx];
        for (int t = 1; t < nth; ++t) tot += gxp[(size_t)t * per + idx];
        gx[s * D + j] = tot * pr.inv[(size_t)j];
      }
    }
  }
  if (gsig) {
    std::vector<double> tsum((size_t)D, 0.0);  // sum_ns t f(d_j)
    for (int t = 0; t < nth; ++t)
      for (int64_t j = 0; j < D; ++j) tsum[(size_t)j] += gsum[(size_t)t * (size_t)D + (size_t)j];
    double G = 0.0;
    for (int64_t n = 0; n < N; ++n) G += (double)g[n];
    if (sigma_numel == 1) {
      const double sg = pr.s[0];
      double tot = 0.0;
      for (int64_t j = 0; j < D; ++j) tot += tsum[(size_t)j];
      gsig[0] = (T)(-(double)D * G / sg + (kind == 0 ? tot / (sg * sg * sg) : tot / (sg * sg)));
    } else {
      for (int64_t j = 0; j < D; ++j) {
        const double sj = pr.s[(size_t)j];
        gsig[j] = (T)(-G / sj + (kind == 0 ? tsum[(size_t)j] / (sj * sj * sj) : tsum[(size_t)j] / (sj * sj)));
      }
    }
  }
}

}  // namespace

void sll_forward(DType dt, const void* y, const void* samples, const void* sigma, int64_t sigma_numel, int kind,
                 int64_t N, int64_t S, int64_t D, void* out) {
  if (dt == DType::kFloat64)
    forward_typed<double>(static_cast<const double*>(y), static_cast<const double*>(samples),
                          static_cast<const double*>(sigma), sigma_numel, kind, N, S, D, static_cast<double*>(out));
  else
    forward_typed<float>(static_cast<const float*>(y), static_cast<const float*>(samples),
                         static_cast<const float*>(sigma), sigma_numel, kind, N, S, D, static_cast<float*>(out));
}

void sll_backward(DType dt, const void* grad_out, const void* y, const void* samples, const void* sigma,
                  int64_t sigma_numel, const void* out, int kind, int64_t N, int64_t S, int64_t D, void* grad_y,
                  void* grad_samples, void* grad_sigma) {
  if (dt == DType::kFloat64)
    backward_typed<double>(static_cast<const double*>(grad_out), static_cast<const double*>(y),
                           static_cast<const double*>(samples), static_cast<const double*>(sigma), sigma_numel,
                           static_cast<const double*>(out), kind, N, S, D, static_cast<double*>(grad_y),
                           static_cast<double*>(grad_samples), static_cast<double*>(grad_sigma));
  else
    backward_typed<float>(static_cast<const float*>(grad_out), static_cast<const float*>(y),
                          static_cast<const float*>(samples), static_cast<const float*>(sigma), sigma_numel,
                          static_cast<const float*>(out), kind, N, S, D, static_cast<float*>(grad_y),
                          static_cast<float*>(grad_samples), static_cast<float*>(grad_sigma));
}

#include "isa_end.h"
