// spread_noise: y = x + sigma * eps, eps ~ N(0, 1) or Laplace(0, 1), on CPU, one pass, OpenMP.
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
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace {

constexpr int kGroups = 64;             // Philox counters per chunk
constexpr int kChunk = 4 * kGroups;     // elements per chunk (4 words per counter)

template <typename To, typename From>
inline To bitcast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bitcast size");
  return __builtin_bit_cast(To, v);
}

// Philox-4x32-10 for kGroups consecutive counters starting at `ctr` (64-bit).
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

// natural log of x > 0 (normal), Cephes logf.
inline float fg_log(float x) {
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
inline void fg_sincos2pi_u32(uint32_t b, float& s, float& c) {
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
inline float fg_sqrt(float t) {
  float tt = t > 1e-30f ? t : 1e-30f;
  float y = bitcast<float>(0x5f3759dfu - (bitcast<uint32_t>(tt) >> 1));
  float h = 0.5f * tt;
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  return t * y;
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

// Offsets of a broadcast operand for consecutive flat indices of a contiguous tensor of `sizes`.
// Dimensions are collapsed where possible; the innermost run is handled in a tight loop.
struct Bcast {
  std::vector<int64_t> size, stride;  // collapsed, outermost first

  Bcast(at::IntArrayRef sizes, at::IntArrayRef strides) {
    for (size_t d = 0; d < sizes.size(); ++d) {
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
  at::parallel_for(0, nchunks, 16, [&](int64_t c0, int64_t c1) {
    alignas(64) float eps[kChunk];
    alignas(64) acc_t sig[kChunk];
    for (int64_t c = c0; c < c1; ++c) {
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
  });
}

// grad_sigma[k] = sum over elements i with sigma-offset k of eps_i * g_i (accumulated in double).
template <typename scalar_t>
void noise_grad_impl(const scalar_t* __restrict g, double* out, int64_t out_numel, const Bcast& bc,
                     int64_t numel, int kind, int64_t seed, int64_t offset) {
  uint32_t k0, k1;
  split_seed(seed, k0, k1);
  const int64_t nchunks = (numel + kChunk - 1) / kChunk;
  const bool full = out_numel == numel;  // no broadcast: out[i] = eps_i g_i
  const int nt = full ? 1 : at::get_num_threads();
  std::vector<double> acc(full ? 0 : (size_t)nt * (size_t)out_numel, 0.0);
  at::parallel_for(0, nchunks, 16, [&](int64_t c0, int64_t c1) {
    alignas(64) float eps[kChunk];
    double* a = full ? nullptr : acc.data() + (size_t)at::get_thread_num() * (size_t)out_numel;
    for (int64_t c = c0; c < c1; ++c) {
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
  });
  if (!full) {
    for (int64_t k = 0; k < out_numel; ++k) {
      double s = 0.0;
      for (int t = 0; t < nt; ++t) s += acc[(size_t)t * (size_t)out_numel + (size_t)k];
      out[k] = s;
    }
  }
}

// The output is written once, in full, by this kernel: ask Linux for transparent huge pages on
// it (when THP is in "madvise" mode, the default on many distributions) so that first-touch page
// faults, which otherwise cost as much as the kernel itself for fresh 64 MiB buffers, drop 512x
// in number. Only the 2 MiB-aligned interior of our own buffer is advised; failure is harmless.
void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < (int64_t)(4 * kHuge)) return;
  uintptr_t a = ((uintptr_t)p + kHuge - 1) & ~(kHuge - 1);
  uintptr_t e = ((uintptr_t)p + (uintptr_t)bytes) & ~(kHuge - 1);
  if (e > a) (void)madvise((void*)a, e - a, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

void check_args(const at::Tensor& x, const at::Tensor& sigma, int64_t kind, const char* xname) {
  TORCH_CHECK(x.device().is_cpu(), "spread_noise (cpu): ", xname, " must be a CPU tensor");
  TORCH_CHECK(sigma.device().is_cpu(), "spread_noise (cpu): sigma must be a CPU tensor");
  TORCH_CHECK(kind == 0 || kind == 1, "spread_noise (cpu): kind must be 0 (gaussian) or 1 (laplace)");
  TORCH_CHECK(x.is_contiguous(), "spread_noise (cpu): ", xname, " must be contiguous");
  TORCH_CHECK(sigma.dim() == x.dim() || sigma.numel() == 1,
              "spread_noise (cpu): sigma must have as many dims as ", xname, " (or one element)");
  TORCH_CHECK(x.dim() <= 16, "spread_noise (cpu): at most 16 dims");
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor spread_noise_cpu(const at::Tensor& x, const at::Tensor& sigma_in, int64_t kind, int64_t seed,
                            int64_t offset) {
  check_args(x, sigma_in, kind, "x");
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  if (numel == 0) return y;
  advise_huge_pages(y.data_ptr(), numel * (int64_t)y.element_size());
  at::Tensor sigma = sigma_in.to(acc_type(x.scalar_type()));  // no copy when already the type
  const bool scalar_sigma = sigma.numel() == 1;
  if (scalar_sigma) sigma = sigma.reshape({1}).contiguous();
  at::Tensor sview = scalar_sigma ? sigma : sigma.expand(x.sizes());  // a view: strides 0
  Bcast bc(x.sizes(), sview.strides());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "spread_noise_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    noise_fwd_impl<scalar_t, acc_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(),
                                    sview.data_ptr<acc_t>(), bc, scalar_sigma, numel, (int)kind, seed,
                                    offset);
  });
  return y;
}

// Returns grad_sigma in sigma's shape, float64 (the caller casts to sigma's dtype).
at::Tensor spread_noise_grad_sigma_cpu(const at::Tensor& grad_y, const at::Tensor& sigma, int64_t kind,
                                       int64_t seed, int64_t offset) {
  check_args(grad_y, sigma, kind, "grad_y");
  at::Tensor out = at::zeros(sigma.sizes(), grad_y.options().dtype(at::kDouble));
  const int64_t numel = grad_y.numel();
  if (numel == 0) return out;
  // Offsets into the contiguous output, viewed with grad_y's sizes (0 on broadcast dims).
  at::Tensor oview = sigma.numel() == 1 ? out.reshape({1}) : out.expand(grad_y.sizes());
  Bcast bc(grad_y.sizes(), sigma.numel() == 1 ? at::IntArrayRef(std::vector<int64_t>(grad_y.dim(), 0))
                                              : oview.strides());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "spread_noise_grad_cpu", [&] {
    noise_grad_impl<scalar_t>(grad_y.data_ptr<scalar_t>(), out.data_ptr<double>(), out.numel(), bc, numel,
                              (int)kind, seed, offset);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_spread_noise_kernel", &spread_noise_cpu);
  m.impl("_spread_noise_grad_sigma_kernel", &spread_noise_grad_sigma_cpu);
}
