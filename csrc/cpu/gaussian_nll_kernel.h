// Fused Gaussian negative log-likelihood on CPU, the compute code: forward and backward in one pass
// over memory. Compiled once per instruction set (csrc/cpu/isa/gaussian_nll_<isa>.cpp, see
// isa_begin.h); the tensor boundary is csrc/cpu/gaussian_nll.cpp.
//
// The problem is viewed as [A, B, C] (row-major, contiguous input / target / loss) with var
// [A, C] broadcast over B: per-element var is A = 1, B = 1, C = N; var of shape [..., 1]
// (trailing 1, or one dimension fewer) is C = 1; a size-1 dimension in the middle of var
// (e.g. [4, 1, 32, 32] for input [4, 3, 32, 32]) is the general case. var is never expanded:
// every element finds its variance by index arithmetic.
//
// Per element (d = input - target, v = max(var, eps), or v = exp(log_var) when log_var):
//   loss = w * (0.5 * (log v + d^2 / v) + c),  c = 0.5 log(2 pi) if full else 0,
//   w = v^beta (beta-NLL, Seitzer et al. 2022; w is a constant for autograd), w = 1 if beta = 0,
//   dloss/dinput = w d / v,  dloss/dtarget = -w d / v,
//   dloss/dvar = 0.5 w (1 - d^2 / v) / v   (straight through the eps clamp, like torch),
//   dloss/dlog_var = 0.5 w (1 - d^2 / v).
// gaussian_nll() returns the loss (0-d sum / mean, or [A*B*C] for reduction "none") and, when
// asked, the gradients of the reduced loss (scaled by 1/N for the mean) computed in the same
// pass; the caller scales them by grad_output in backward (Liger-Kernel style). It also
// returns a 0-d int32 flag: 1 when var has a negative entry (found in the same pass; the
// Python layer raises ValueError like torch). gaussian_nll_backward() is the fused pass for
// reduction "none", where grad_output is per element.
//
// Compute is in float for float / half / bfloat16 (double for double); sums of a tile are
// float, sums of tiles double. The float path is written on W-lane GCC/Clang vector types (one
// native register: vmath.h)
// (AVX-512, AVX2 or SSE code from the same source), with branch-free polynomial log and exp
// (musl / Cephes coefficients, < 1 ulp and ~1 ulp; 0, inf, NaN and subnormals handled like
// libm): GCC does not vectorise a scalar loop calling logf without -ffast-math.
#include "kernel_common.h"
#include "isa_begin.h"
#include "vmath.h"

namespace {

constexpr int64_t TILE = 256;      // elements computed into L1 buffers at a time
constexpr int64_t CHUNK = 16384;   // elements per OpenMP task (multiple of TILE)

// W lanes from p (rem valid elements; lanes >= rem get pad), converted to float.
template <typename T>
FG_INLINE vf load16(const T* p, int64_t rem, float pad) {
  alignas(64) float b[W];
  if (rem >= W) {
    for (int k = 0; k < W; ++k) b[k] = static_cast<float>(p[k]);
  } else {
    for (int k = 0; k < W; ++k) b[k] = k < rem ? static_cast<float>(p[k]) : pad;
  }
  vf r;
  std::memcpy(&r, b, sizeof(r));
  return r;
}
template <>
FG_INLINE vf load16<float>(const float* p, int64_t rem, float pad) {
  vf r;
  if (rem >= W) {
    std::memcpy(&r, p, sizeof(r));
  } else {
    alignas(64) float b[W];
    for (int k = 0; k < W; ++k) b[k] = k < rem ? p[k] : pad;
    std::memcpy(&r, b, sizeof(r));
  }
  return r;
}

template <typename acc_t>
struct Params {
  acc_t eps, beta, c;  // clamp, beta-NLL exponent, constant (0 or 0.5 log 2 pi)
};

// One tile of n <= TILE elements. x, t: the tile's input / target; v: its var (stride 1, or a
// single value when VCONST). Writes the per-element loss into l[] and, when GRAD, the unscaled
// gradient factors gi[] (d loss / d input) and gv[] (d loss / d var or d log_var); l, gi, gv
// hold TILE floats (64-byte aligned). Returns the tile's loss sum; sets neg when a var entry
// is negative. float / half / bfloat16: W-lane vectors, computed in float.
template <typename scalar_t, typename acc_t, bool LOGV, bool BETA, bool VCONST, bool GRAD>
inline typename std::enable_if<std::is_same<acc_t, float>::value, float>::type tile(
    const scalar_t* __restrict x, const scalar_t* __restrict t, const scalar_t* __restrict v, int64_t n,
    const Params<float>& p, float* __restrict l, float* __restrict gi, float* __restrict gv, int& neg) {
  const vf eps = splat(p.eps), half = splat(0.5f), one = splat(1.0f);
  const float beta = p.beta, c = p.c;
  const vf v0 = splat(static_cast<float>(v[0]));
  vi lane;
  for (int k = 0; k < W; ++k) lane[k] = k;
  vf sum = vf{};
  vi ng = vi{};
  for (int64_t j = 0; j < n; j += W) {
    const int64_t rem = n - j;
    const vf xv = load16(x + j, rem, 0.0f);
    const vf tv = load16(t + j, rem, 0.0f);
    const vf vv = VCONST ? v0 : load16(v + j, rem, 1.0f);
    const vf d = xv - tv;
    vf inv, lg;
    if (LOGV) {
      lg = vv;
      inv = vexp(-vv);
    } else {
      ng |= vv < 0.0f;
      const vf vc = sel(vv < eps, eps, vv);  // NaN stays NaN, like torch.clamp
      inv = one / vc;
      lg = vlog(vc);
    }
    const vf r2 = d * d * inv;
    const vf w = BETA ? vexp(beta * lg) : one;
    const vf li = w * (half * (lg + r2) + c);
    std::memcpy(l + j, &li, sizeof(li));
    sum += sel(lane < splati((int32_t)std::min<int64_t>(rem, W)), li, vf{});
    if (GRAD) {
      const vf a = w * d * inv;
      const vf b = LOGV ? half * w * (one - r2) : half * w * inv * (one - r2);
      std::memcpy(gi + j, &a, sizeof(a));
      std::memcpy(gv + j, &b, sizeof(b));
    }
  }
  float s = 0.0f;
  int anyneg = 0;
  for (int k = 0; k < W; ++k) {
    s += sum[k];
    anyneg |= ng[k];
  }
  neg |= anyneg ? 1 : 0;
  return s;
}

// double: scalar libm (not a hot path; gradcheck and float64 users).
template <typename scalar_t, typename acc_t, bool LOGV, bool BETA, bool VCONST, bool GRAD>
inline typename std::enable_if<std::is_same<acc_t, double>::value, double>::type tile(
    const scalar_t* __restrict x, const scalar_t* __restrict t, const scalar_t* __restrict v, int64_t n,
    const Params<double>& p, double* __restrict l, double* __restrict gi, double* __restrict gv, int& neg) {
  double sum = 0;
  int ng = 0;
  const double eps = p.eps, beta = p.beta, c = p.c;
  for (int64_t j = 0; j < n; ++j) {
    const double vv = VCONST ? static_cast<double>(v[0]) : static_cast<double>(v[j]);
    const double d = static_cast<double>(x[j]) - static_cast<double>(t[j]);
    double inv, lg;
    if (LOGV) {
      lg = vv;
      inv = std::exp(-vv);
    } else {
      ng |= (vv < 0.0) ? 1 : 0;
      const double vc = vv < eps ? eps : vv;
      inv = 1.0 / vc;
      lg = std::log(vc);
    }
    const double r2 = d * d * inv;
    const double w = BETA ? std::exp(beta * lg) : 1.0;
    const double li = w * (0.5 * (lg + r2) + c);
    l[j] = li;
    sum += li;
    if (GRAD) {
      gi[j] = w * d * inv;
      gv[j] = LOGV ? 0.5 * w * (1.0 - r2) : 0.5 * w * inv * (1.0 - r2);
    }
  }
  neg |= ng;
  return sum;
}

// outputs: NllOuts (kernels.h)
using Outs = NllOuts;

// Runs the fused pass. scale multiplies every gradient (1/N for the mean, 1 for the sum, 1 with
// a per-element go). Returns the double loss sum; neg set when a var entry is negative.
template <typename scalar_t, typename acc_t, bool LOGV, bool BETA>
double run(const scalar_t* x, const scalar_t* t, const scalar_t* v, int64_t A, int64_t B, int64_t C,
           const Params<acc_t>& p, acc_t scale, bool grad, const Outs& o, int& neg_out) {
  scalar_t* lo = static_cast<scalar_t*>(o.loss_none);
  scalar_t* gin = static_cast<scalar_t*>(o.gin);
  scalar_t* gt = static_cast<scalar_t*>(o.gt);
  scalar_t* gvar = static_cast<scalar_t*>(o.gvar);
  const scalar_t* go = static_cast<const scalar_t*>(o.go);
  const bool need_gv = gvar != nullptr;
  const int nthreads = std::max(1, omp_get_max_threads());
  double total = 0.0;
  int neg = 0;

  // Writes one computed tile (global element offset e0, n elements) to the per-element outputs
  // and returns the per-element gradient-of-var factors (scaled) in gv for the caller to store
  // or accumulate.
  auto emit = [&](int64_t e0, int64_t n, acc_t* l, acc_t* gi, acc_t* gv) {
    if (lo) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) lo[e0 + j] = static_cast<scalar_t>(l[j]);
    }
    if (!grad) return;
    if (go) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const acc_t g = static_cast<acc_t>(go[e0 + j]);
        gi[j] *= g;
        gv[j] *= g;
      }
    } else if (scale != acc_t(1)) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        gi[j] *= scale;
        gv[j] *= scale;
      }
    }
    if (gin) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) gin[e0 + j] = static_cast<scalar_t>(gi[j]);
    }
    if (gt) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) gt[e0 + j] = static_cast<scalar_t>(-gi[j]);
    }
  };

  if (B == 1) {
    // Per-element var: one flat pass over N = A * C elements.
    const int64_t N = A * C;
    const int64_t ntasks = (N + CHUNK - 1) / CHUNK;
    std::vector<double> tsums((size_t)ntasks);  // per-task sums, added in order: deterministic
#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(| : neg) if (ntasks > 1)
    for (int64_t task = 0; task < ntasks; ++task) {
      alignas(64) acc_t l[TILE], gi[TILE], gv[TILE];
      const int64_t end = std::min(N, (task + 1) * CHUNK);
      double tsum = 0.0;
      int ng = 0;
      for (int64_t e0 = task * CHUNK; e0 < end; e0 += TILE) {
        const int64_t n = std::min(TILE, end - e0);
        if (grad)
          tsum += tile<scalar_t, acc_t, LOGV, BETA, false, true>(x + e0, t + e0, v + e0, n, p, l, gi, gv, ng);
        else
          tsum += tile<scalar_t, acc_t, LOGV, BETA, false, false>(x + e0, t + e0, v + e0, n, p, l, gi, gv, ng);
        emit(e0, n, l, gi, gv);
        if (need_gv) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) gvar[e0 + j] = static_cast<scalar_t>(gv[j]);
        }
      }
      tsums[(size_t)task] = tsum;
      neg |= ng;
    }
    for (double ts : tsums) total += ts;
    neg_out = neg;
    return total;
  }

  // var broadcast over B. Split B into nbs ranges when A * (C tiles) alone gives too few
  // tasks; var-gradient partial sums of the ranges go to part[nbs][A*C] (small: only when
  // A*C is small) and are added up at the end.
  const int64_t ncc = (C + TILE - 1) / TILE;
  const int64_t per_b = std::min(C, TILE);  // elements per b row of a task
  const int64_t want = 4 * (int64_t)nthreads;
  int64_t nbs = 1;
  if (A * ncc < want) nbs = std::min(B, (want + A * ncc - 1) / (A * ncc));
  // no range shorter than CHUNK elements unless B itself is short
  nbs = std::max<int64_t>(1, std::min(nbs, (B * per_b + CHUNK - 1) / CHUNK));
  const int64_t brange = (B + nbs - 1) / nbs;
  nbs = (B + brange - 1) / brange;
  std::vector<acc_t> part;
  if (need_gv) part.assign((size_t)(nbs * A * C), acc_t(0));
  const int64_t ntasks = A * ncc * nbs;
  std::vector<double> tsums((size_t)ntasks);

#pragma omp parallel for schedule(static) num_threads(nthreads) reduction(| : neg) if (ntasks > 1)
  for (int64_t task = 0; task < ntasks; ++task) {
    alignas(64) acc_t l[TILE], gi[TILE], gv[TILE], gacc[TILE];
    const int64_t bs = task % nbs;
    const int64_t cc = (task / nbs) % ncc;
    const int64_t a = task / (nbs * ncc);
    const int64_t b_lo = bs * brange, b_hi = std::min(B, b_lo + brange);
    double tsum = 0.0;
    int ng = 0;
    if (C == 1) {
      // var[a] is one value for the whole row segment: tiles run along b.
      acc_t gsum = 0;
      const scalar_t* vp = v + a;
      for (int64_t b0 = b_lo; b0 < b_hi; b0 += TILE) {
        const int64_t n = std::min(TILE, b_hi - b0);
        const int64_t e0 = a * B + b0;
        if (grad)
          tsum += tile<scalar_t, acc_t, LOGV, BETA, true, true>(x + e0, t + e0, vp, n, p, l, gi, gv, ng);
        else
          tsum += tile<scalar_t, acc_t, LOGV, BETA, true, false>(x + e0, t + e0, vp, n, p, l, gi, gv, ng);
        emit(e0, n, l, gi, gv);
        if (need_gv) {
          acc_t s = 0;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < n; ++j) s += gv[j];
          gsum += s;
        }
      }
      if (need_gv) part[(size_t)(bs * A + a)] = gsum;
    } else {
      // tiles run along c (var varies), accumulated over the b range.
      const int64_t c0 = cc * TILE;
      const int64_t n = std::min(TILE, C - c0);
      const scalar_t* vp = v + a * C + c0;
      for (int64_t j = 0; j < n; ++j) gacc[j] = 0;
      for (int64_t b = b_lo; b < b_hi; ++b) {
        const int64_t e0 = (a * B + b) * C + c0;
        if (grad)
          tsum += tile<scalar_t, acc_t, LOGV, BETA, false, true>(x + e0, t + e0, vp, n, p, l, gi, gv, ng);
        else
          tsum += tile<scalar_t, acc_t, LOGV, BETA, false, false>(x + e0, t + e0, vp, n, p, l, gi, gv, ng);
        emit(e0, n, l, gi, gv);
        if (need_gv) {
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) gacc[j] += gv[j];
        }
      }
      if (need_gv) {
        acc_t* dst = part.data() + bs * A * C + a * C + c0;
        for (int64_t j = 0; j < n; ++j) dst[j] = gacc[j];
      }
    }
    tsums[(size_t)task] = tsum;
    neg |= ng;
  }
  for (double ts : tsums) total += ts;
  if (need_gv) {
    const int64_t M = A * C;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M > 65536)
    for (int64_t i = 0; i < M; ++i) {
      acc_t s = 0;
      for (int64_t bs = 0; bs < nbs; ++bs) s += part[(size_t)(bs * M + i)];
      gvar[i] = static_cast<scalar_t>(s);
    }
  }
  neg_out = neg;
  return total;
}

template <typename scalar_t>
double dispatch_run(const void* x, const void* t, const void* v, int64_t A, int64_t B, int64_t C, bool full,
                    double eps, bool log_var, double beta, double scale, bool grad, const NllOuts& o, int& neg) {
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  Params<acc_t> p{static_cast<acc_t>(eps), static_cast<acc_t>(beta),
                  static_cast<acc_t>(full ? 0.5 * std::log(2.0 * M_PI) : 0.0)};
  const scalar_t* xp = static_cast<const scalar_t*>(x);
  const scalar_t* tp = static_cast<const scalar_t*>(t);
  const scalar_t* vp = static_cast<const scalar_t*>(v);
  const acc_t s = static_cast<acc_t>(scale);
  const bool bt = beta != 0.0;
  if (log_var) {
    return bt ? run<scalar_t, acc_t, true, true>(xp, tp, vp, A, B, C, p, s, grad, o, neg)
              : run<scalar_t, acc_t, true, false>(xp, tp, vp, A, B, C, p, s, grad, o, neg);
  }
  return bt ? run<scalar_t, acc_t, false, true>(xp, tp, vp, A, B, C, p, s, grad, o, neg)
            : run<scalar_t, acc_t, false, false>(xp, tp, vp, A, B, C, p, s, grad, o, neg);
}

}  // namespace

double gaussian_nll(DType dt, const void* input, const void* target, const void* var, int64_t A, int64_t B,
                    int64_t C, bool full, double eps, bool log_var, double beta, double scale, bool grad,
                    const NllOuts& outs, int* neg) {
  int ng = 0;
  double total = 0.0;
  switch (dt) {
    case DType::kFloat32:
      total = dispatch_run<float>(input, target, var, A, B, C, full, eps, log_var, beta, scale, grad, outs, ng);
      break;
    case DType::kFloat64:
      total = dispatch_run<double>(input, target, var, A, B, C, full, eps, log_var, beta, scale, grad, outs, ng);
      break;
    case DType::kFloat16:
      total = dispatch_run<Half>(input, target, var, A, B, C, full, eps, log_var, beta, scale, grad, outs, ng);
      break;
    case DType::kBFloat16:
      total = dispatch_run<BFloat16>(input, target, var, A, B, C, full, eps, log_var, beta, scale, grad, outs, ng);
      break;
  }
  if (neg) *neg = ng;
  return total;
}

#include "isa_end.h"
