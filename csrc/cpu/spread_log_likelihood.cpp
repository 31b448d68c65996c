// spread_log_likelihood on CPU: fused forward and backward, OpenMP (at::parallel_for).
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
#include <ATen/Parallel.h>
#pragma GCC diagnostic ignored "-Wpsabi"  // vector-extension types in inline helpers only
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int R = 4;     // y rows per micro-tile
constexpr int L = 16;    // samples per micro-tile (SIMD lanes)
constexpr int RB = 32;   // y rows per block (one parallel task)
constexpr int SB = 256;  // samples per block (packed block stays in L2)

template <typename To, typename From>
inline To bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bitcast size");
  return __builtin_bit_cast(To, v);
}

// exp(x) for x <= 0 (Cephes expf), exp(x) = 0 below -87. Branch-free and free of float->int
// conversions and float compares (which, under the default -ftrapping-math, stop GCC from
// vectorising the loop): the clamp is an integer compare on the bit pattern (x <= 0), the
// rounding to an integer multiple of ln 2 uses the 1.5 * 2^23 trick.
inline float fg_exp(float x) {
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
inline double fg_exp(double x) { return std::exp(x); }

// |v| and sign(v) (sign(0) = 0) by bit operations (vectorise without -fno-trapping-math).
inline float fg_abs(float v) { return bitcast<float>(bitcast<uint32_t>(v) & 0x7fffffffu); }
inline double fg_abs(double v) { return bitcast<double>(bitcast<uint64_t>(v) & 0x7fffffffffffffffull); }
inline float fg_sign(float v) {
  const uint32_t b = bitcast<uint32_t>(v);
  return bitcast<float>((b & 0x7fffffffu) ? ((b & 0x80000000u) | 0x3f800000u) : 0u);
}
inline double fg_sign(double v) {
  const uint64_t b = bitcast<uint64_t>(v);
  return bitcast<double>((b & 0x7fffffffffffffffull) ? ((b & 0x8000000000000000ull) | 0x3ff0000000000000ull) : 0ull);
}

// GCC / Clang vector extensions: one value per sample lane (L lanes). Used where the loops
// must stay in registers (the backward pass); lowered to AVX-512, AVX2 or SSE as available.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(sizeof(T) * L)));
};
template <typename T>
struct IVec {
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I type __attribute__((vector_size(sizeof(T) * L)));
};
template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}
// sign(d) with sign(0) = 0, lane-wise
template <typename T>
inline typename Vec<T>::type vsign(typename Vec<T>::type d) {
  using VI = typename IVec<T>::type;
  using I = typename IVec<T>::I;
  const I sbit = (I)((std::make_unsigned_t<I>)1 << (sizeof(I) * 8 - 1));
  const I one = sizeof(T) == 4 ? (I)0x3f800000 : (I)0x3ff0000000000000LL;
  const typename Vec<T>::type zero = {};
  VI b = (VI)d;
  VI r = ((b & sbit) | one) & (VI)(d != zero);
  return (typename Vec<T>::type)r;
}
// exp(x) lane-wise for x <= 0 (float: the polynomial of fg_exp; double: std::exp per lane)
inline Vec<float>::type vexp(Vec<float>::type x) {
  using V = Vec<float>::type;
  using VI = IVec<float>::type;
  typedef uint32_t VU __attribute__((vector_size(sizeof(float) * L)));
  const uint32_t lim = 0xC2AE0000u;  // bits of -87.0f: larger unsigned bits = more negative
  VU ux = (VU)x;
  VI under = ux > lim;               // -1 where x < -87 (never for x >= 0)
  x = (V)(under ? (VU){} + lim : ux);
  const float magic = 12582912.0f;
  V t = x * 1.44269504088896341f + magic;
  VI n = (VI)t - (int32_t)0x4B400000;                   // bits of magic
  V fx = t - magic;
  x = x - fx * 0.693359375f;
  x = x + fx * 2.12194440e-4f;
  V z = x * x;
  V y = x * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  V p2 = (V)((n + 127) << 23);
  return (V)((VI)(y * p2) & ~under);
}
inline Vec<double>::type vexp(Vec<double>::type x) {
  for (int l = 0; l < L; ++l) x[l] = std::exp(x[l]);
  return x;
}

// Pack samples [S, D] into [ntiles][D][L] (zero padded).
template <typename T>
void pack_samples(const T* x, int64_t S, int64_t D, T* packed) {
  const int64_t ntiles = (S + L - 1) / L;
  at::parallel_for(0, ntiles, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
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
  });
}

// Pack samples [S, D] into [nblocks][D][SB / L][L] (zero padded): per sample block, one
// dimension's values of all its tiles are contiguous, so the backward's loop over tiles at fixed
// j walks memory linearly (the tile layout strides by D * L * 4 bytes = 4 KiB for D = 64, which
// maps every access of that loop to one L1 set).
template <typename T>
void pack_samples_blocks(const T* x, int64_t S, int64_t D, T* packed) {
  constexpr int NT = SB / L;
  const int64_t nb = (S + SB - 1) / SB;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      T* p = packed + b * D * SB;
      for (int t = 0; t < NT; ++t)
        for (int l = 0; l < L; ++l) {
          const int64_t s = b * SB + t * L + l;
          const T* xs = x + s * D;
          for (int64_t j = 0; j < D; ++j) p[(j * NT + t) * L + l] = s < S ? xs[j] : T(0);
        }
    }
  });
}

// acc[r][l] = sum_j f(w_j (y_rj - x_lj)), f = square (Gaussian) or abs (Laplace).
template <typename T, int KIND, bool PERDIM>
inline void micro(const T* const* yr, const T* __restrict xp, const T* __restrict w, int64_t D,
                  T (&acc)[R][L]) {
  T a[R][L];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < L; ++l) a[r][l] = T(0);
  const T* __restrict y0 = yr[0];
  const T* __restrict y1 = yr[1];
  const T* __restrict y2 = yr[2];
  const T* __restrict y3 = yr[3];
  for (int64_t j = 0; j < D; ++j) {
    const T* __restrict xj = xp + j * L;
    const T wj = PERDIM ? w[j] : T(1);
    const T yv[R] = {y0[j], y1[j], y2[j], y3[j]};
    for (int r = 0; r < R; ++r) {
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        T d = yv[r] - xj[l];
        if (PERDIM) d *= wj;
        a[r][l] += KIND == 0 ? d * d : fg_abs(d);
      }
    }
  }
  for (int r = 0; r < R; ++r)
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

// lse[n] = logsumexp_s a_ns (without the normalising constant).
template <typename T, int KIND, bool PERDIM>
void forward_impl(const Problem<T>& p, double* lse) {
  const int64_t nblocks = (p.N + RB - 1) / RB;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> buf((size_t)RB * SB);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * RB;
      const int nr = (int)std::min<int64_t>(RB, p.N - n0);
      T m[RB];
      double ssum[RB];
      for (int r = 0; r < RB; ++r) {
        m[r] = -std::numeric_limits<T>::infinity();
        ssum[r] = 0.0;
      }
      for (int64_t s0 = 0; s0 < p.S; s0 += SB) {
        const int ns = (int)std::min<int64_t>(SB, p.S - s0);
        const int nt = (ns + L - 1) / L;
        for (int rg = 0; rg < nr; rg += R) {
          const T* yr[R];
          for (int r = 0; r < R; ++r) yr[r] = p.y + std::min<int64_t>(n0 + rg + r, p.N - 1) * p.D;
          for (int t = 0; t < nt; ++t) {
            T acc[R][L];
            micro<T, KIND, PERDIM>(yr, p.xp + (s0 / L + t) * p.D * L, p.w, p.D, acc);
            for (int r = 0; r < R && rg + r < nr; ++r) {
              T* o = buf.data() + (size_t)(rg + r) * SB + t * L;
#pragma omp simd
              for (int l = 0; l < L; ++l) o[l] = -p.scale * acc[r][l];
            }
          }
        }
        for (int r = 0; r < nr; ++r) {
          const T* o = buf.data() + (size_t)r * SB;
          T bm = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : bm)
          for (int k = 0; k < ns; ++k) bm = o[k] > bm ? o[k] : bm;
          if (bm > m[r]) {
            if (ssum[r] > 0.0) ssum[r] *= std::exp((double)m[r] - (double)bm);
            m[r] = bm;
          }
          if (m[r] == -std::numeric_limits<T>::infinity()) continue;  // every term underflowed so far
          const T mr = m[r];
          T bs = T(0);
#pragma omp simd reduction(+ : bs)
          for (int k = 0; k < ns; ++k) bs += fg_exp(o[k] - mr);
          ssum[r] += (double)bs;
        }
      }
      for (int r = 0; r < nr; ++r) lse[n0 + r] = (double)m[r] + std::log(ssum[r]);
    }
  });
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
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    const int tid = at::get_thread_num();
    T* gx = gxp ? gxp + (size_t)tid * sblocks * D * SB : nullptr;
    double* gs = gsum + (size_t)tid * D;
    std::vector<T> gyrow((size_t)RB * D);  // per-row totals for the block
    using V = typename Vec<T>::type;
    V tw[NT][R];                            // weights of the current rows x sample block
    for (int64_t b = b0; b < b1; ++b) {
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
            micro<T, KIND, PERDIM>(yr, xblk + t * D * L, p.w, D, acc);
            const int nvalid = std::min(L, ns - t * L);
            for (int r = 0; r < R; ++r) {
              V e = vexp(vload(&acc[r][0]) * (-p.scale) - lr[r]) * gr[r];
              if (nvalid < L)
                for (int l = nvalid; l < L; ++l) e[l] = T(0);
              tw[t][r] = e;
            }
          }
          // pass 2
          for (int64_t j = 0; j < D; ++j) {
            // independent accumulators per row: no loop-carried chain longer than one add
            V gya[R] = {}, ssa[R] = {};
            const T yv[R] = {yr[0][j], yr[1][j], yr[2][j], yr[3][j]};
            const T* xqj = xqb + j * SB;
            T* gxj = gxblk ? gxblk + j * SB : nullptr;
            for (int t = 0; t < nt; ++t) {
              const V xv = vload(xqj + t * L);
              V u[R];
              for (int r = 0; r < R; ++r) {
                const V d = yv[r] - xv;
                u[r] = tw[t][r] * (KIND == 0 ? d : vsign<T>(d));
                if (need_y) gya[r] += u[r];        // (loop-invariant flags: unswitched)
                if (need_sigma) ssa[r] += u[r] * d;
              }
              if (gxj) vstore(gxj + t * L, vload(gxj + t * L) + ((u[0] + u[1]) + (u[2] + u[3])));
            }
            if (need_y)
              for (int r = 0; r < R && rg + r < nr; ++r) {
                T sum = T(0);
                for (int l = 0; l < L; ++l) sum += gya[r][l];
                gyrow[(size_t)(rg + r) * D + j] += sum;
              }
            if (need_sigma) {
              const V ss = (ssa[0] + ssa[1]) + (ssa[2] + ssa[3]);
              double sum = 0.0;
              for (int l = 0; l < L; ++l) sum += (double)ss[l];
              gs[j] += sum;
            }
          }
        }
      }
      if (gy)
        for (int r = 0; r < nr; ++r)
          for (int64_t j = 0; j < D; ++j) gy[(n0 + r) * D + j] = -fy[j] * gyrow[(size_t)r * D + j];
    }
  });
}

struct Prepared {
  at::Tensor w;       // per-dim weights for the micro-kernel (PERDIM), else 1 element
  double scale;       // a = -scale * acc
  double logc;        // normalising constant of log K, without -log S
  at::Tensor inv;     // per-dim 1/s (Laplace) or 1/s^2 (Gaussian): the factor of grad_y / grad_x
  bool perdim;
};

// sigma: [1] or [D], same dtype as y.
Prepared prepare(const at::Tensor& sigma, int64_t D, int64_t kind) {
  Prepared pr;
  at::Tensor s64 = sigma.to(at::kDouble).contiguous();
  const double* s = s64.data_ptr<double>();
  pr.perdim = sigma.numel() > 1;
  const double log2pi = std::log(2.0 * M_PI);
  if (!pr.perdim) {
    const double sg = s[0];
    pr.scale = kind == 0 ? 0.5 / (sg * sg) : 1.0 / sg;
    pr.logc = kind == 0 ? -(double)D * (std::log(sg) + 0.5 * log2pi) : -(double)D * std::log(2.0 * sg);
    pr.w = at::ones({1}, sigma.options());
    pr.inv = at::full({D}, kind == 0 ? 1.0 / (sg * sg) : 1.0 / sg, sigma.options());
  } else {
    at::Tensor w64 = kind == 0 ? std::sqrt(0.5) / s64 : 1.0 / s64;
    pr.w = w64.to(sigma.scalar_type()).contiguous();
    pr.scale = 1.0;
    double lc = 0.0;
    for (int64_t j = 0; j < D; ++j) lc += kind == 0 ? -(std::log(s[j]) + 0.5 * log2pi) : -std::log(2.0 * s[j]);
    pr.logc = lc;
    pr.inv = (kind == 0 ? 1.0 / (s64 * s64) : 1.0 / s64).to(sigma.scalar_type()).contiguous();
  }
  return pr;
}

void check_inputs(const at::Tensor& y, const at::Tensor& x, const at::Tensor& sigma, int64_t kind) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu() && sigma.device().is_cpu(),
              "spread_log_likelihood (cpu): tensors must be on the CPU");
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && y.size(1) == x.size(1),
              "spread_log_likelihood (cpu): y [N, D] and samples [S, D] expected");
  TORCH_CHECK(y.scalar_type() == x.scalar_type() && y.scalar_type() == sigma.scalar_type() &&
                  (y.scalar_type() == at::kFloat || y.scalar_type() == at::kDouble),
              "spread_log_likelihood (cpu): y, samples, sigma must share dtype float32 or float64");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && sigma.is_contiguous(),
              "spread_log_likelihood (cpu): contiguous inputs expected");
  TORCH_CHECK(sigma.numel() == 1 || (sigma.dim() == 1 && sigma.size(0) == y.size(1)),
              "spread_log_likelihood (cpu): sigma must have 1 or D elements");
  TORCH_CHECK(kind == 0 || kind == 1, "spread_log_likelihood (cpu): kind must be 0 or 1");
  TORCH_CHECK(y.size(0) > 0 && x.size(0) > 0 && y.size(1) > 0, "spread_log_likelihood (cpu): empty input");
}

template <typename T, typename F>
void dispatch_kind(int64_t kind, bool perdim, F f) {
  if (kind == 0) {
    if (perdim) f(std::integral_constant<int, 0>{}, std::true_type{});
    else f(std::integral_constant<int, 0>{}, std::false_type{});
  } else {
    if (perdim) f(std::integral_constant<int, 1>{}, std::true_type{});
    else f(std::integral_constant<int, 1>{}, std::false_type{});
  }
}

// Returns out [N] (y's dtype).
at::Tensor sll_forward_cpu(const at::Tensor& y, const at::Tensor& samples, const at::Tensor& sigma, int64_t kind) {
  check_inputs(y, samples, sigma, kind);
  const int64_t N = y.size(0), S = samples.size(0), D = y.size(1);
  Prepared pr = prepare(sigma, D, kind);
  at::Tensor lse = at::empty({N}, y.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "spread_log_likelihood_cpu", [&] {
    using T = scalar_t;
    at::Tensor xp = at::empty({(S + L - 1) / L * D * L}, samples.options());
    pack_samples<T>(samples.data_ptr<T>(), S, D, xp.data_ptr<T>());
    Problem<T> p{y.data_ptr<T>(), xp.data_ptr<T>(), nullptr, N, S, D, pr.w.data_ptr<T>(), (T)pr.scale};
    dispatch_kind<T>(kind, pr.perdim, [&](auto K, auto PD) {
      forward_impl<T, decltype(K)::value, decltype(PD)::value>(p, lse.data_ptr<double>());
    });
  });
  return (lse + (pr.logc - std::log((double)S))).to(y.scalar_type());
}

// Returns (grad_y, grad_samples, grad_sigma); empty tensors where not requested.
// grad_sigma has sigma's shape ([1] or [D]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sll_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& samples, const at::Tensor& sigma,
    const at::Tensor& out, int64_t kind, bool need_y, bool need_samples, bool need_sigma) {
  check_inputs(y, samples, sigma, kind);
  const int64_t N = y.size(0), S = samples.size(0), D = y.size(1);
  TORCH_CHECK(grad_out.numel() == N && out.numel() == N, "spread_log_likelihood (cpu): grad_out, out must be [N]");
  Prepared pr = prepare(sigma, D, kind);
  at::Tensor g = grad_out.to(y.scalar_type()).contiguous();
  // lse without constants: out - logc + log S
  at::Tensor lse = (out.to(at::kDouble) - (pr.logc - std::log((double)S))).contiguous();
  const int nth = at::get_num_threads();
  const int64_t ntiles = (S + L - 1) / L;
  at::Tensor gy, gx, gsig;
  at::Tensor gsum = at::zeros({nth, D}, y.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "spread_log_likelihood_backward_cpu", [&] {
    using T = scalar_t;
    at::Tensor xp = at::empty({ntiles * D * L}, samples.options());
    pack_samples<T>(samples.data_ptr<T>(), S, D, xp.data_ptr<T>());
    const int64_t sblocks = (S + SB - 1) / SB;
    at::Tensor xq = at::empty({sblocks * D * SB}, samples.options());
    pack_samples_blocks<T>(samples.data_ptr<T>(), S, D, xq.data_ptr<T>());
    Problem<T> p{y.data_ptr<T>(), xp.data_ptr<T>(), xq.data_ptr<T>(), N, S, D, pr.w.data_ptr<T>(), (T)pr.scale};
    if (need_y) gy = at::empty({N, D}, y.options());
    at::Tensor gxp;
    if (need_samples) gxp = at::zeros({nth, sblocks * D * SB}, y.options());
    dispatch_kind<T>(kind, pr.perdim, [&](auto K, auto PD) {
      backward_impl<T, decltype(K)::value, decltype(PD)::value>(
          p, g.data_ptr<T>(), lse.data_ptr<double>(), pr.inv.data_ptr<T>(), need_y ? gy.data_ptr<T>() : nullptr,
          need_samples ? gxp.data_ptr<T>() : nullptr, gsum.data_ptr<double>(), need_sigma);
    });
    if (need_samples) {
      // sum over threads, unpack [nblocks][D][SB] -> [S, D], times the per-dim factor
      at::Tensor tot = gxp.sum(0).view({sblocks, D, SB}).permute({0, 2, 1}).reshape({sblocks * SB, D});
      gx = (tot.narrow(0, 0, S) * pr.inv.view({1, D})).contiguous();
    }
  });
  if (need_sigma) {
    at::Tensor s64 = sigma.to(at::kDouble).reshape({-1});
    at::Tensor tsum = gsum.sum(0);  // [D]: sum_ns t f(d_j)
    const double G = grad_out.to(at::kDouble).sum().item<double>();
    if (sigma.numel() == 1) {
      const double sg = s64[0].item<double>();
      const double tot = tsum.sum().item<double>();
      const double v = -(double)D * G / sg + (kind == 0 ? tot / (sg * sg * sg) : tot / (sg * sg));
      gsig = at::full(sigma.sizes(), v, sigma.options());
    } else {
      at::Tensor v = -G / s64 + (kind == 0 ? tsum / (s64 * s64 * s64) : tsum / (s64 * s64));
      gsig = v.to(sigma.scalar_type()).reshape(sigma.sizes());
    }
  }
  // unrequested gradients come back as empty tensors (the op schema returns three Tensors)
  if (!gy.defined()) gy = at::empty({0}, y.options());
  if (!gx.defined()) gx = at::empty({0}, y.options());
  if (!gsig.defined()) gsig = at::empty({0}, y.options());
  return {gy, gx, gsig};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_spread_log_likelihood_kernel", &sll_forward_cpu);
  m.impl("_spread_log_likelihood_backward_kernel", &sll_backward_cpu);
}
