// The plain-C++ interface between the tensor boundary (csrc/cpu/<op>.cpp: argument checks,
// allocation, dtype switch, registration) and the compute code (csrc/cpu/<op>_kernel.h), which is
// compiled once per CPU instruction set (csrc/cpu/isa/<op>_<isa>.cpp) and picked once at load time
// (csrc/cpu/isa.cpp). Only pointers, sizes and scalars cross it: no at:: / c10:: / torch:: types,
// so the boundary can move to the LibTorch stable ABI without touching the kernels.
//
// Conventions: every array is contiguous, row-major, in the element type `dt` unless stated;
// threads are OpenMP (omp_get_max_threads(), which torch.set_num_threads sets: torch and this
// library share libgomp). A kernel never allocates its outputs: the boundary passes them in.
// Errors the boundary must turn into Python exceptions come back as status codes; kernels() and
// isa_in_use() throw std::runtime_error (RuntimeError in Python) for a bad FASTGEN_CPU_ISA.
#pragma once

#include <cstdint>

namespace fastgen_cpu {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// CPU paths. kNative: the whole library was built with FASTGEN_NATIVE=1 (-march=native): one path.
enum Isa : int32_t { kBaseline = 0, kAVX2 = 1, kAVX512 = 2, kNative = 3 };

// gaussian_nll outputs (null where not wanted). loss_none, gin, gt: [A*B*C] in dt; gvar: [A*C] in dt;
// go: [A*B*C] per-element grad_output in dt (backward of reduction "none"), or null.
struct NllOuts {
  void* loss_none;
  void* gin;
  void* gt;
  void* gvar;
  const void* go;
};

// The kernels of one instruction set. Signatures (see each <op>_kernel.h for the mathematics):
#define FASTGEN_CPU_KERNEL_DECLS                                                                       \
  /* knn: query [B,N,D], key [B,M,D] in dt; dist [B,N,k] float64 for kFloat64 else float32;         \
     index [B,N,k] int64. 1 <= k <= M < 2^31, D >= 1. Returns 0, or 1 / 2 when query / key holds   \
     NaN or inf (outputs then incomplete). */                                                       \
  int knn(DType dt, const void* query, const void* key, int64_t B, int64_t N, int64_t M, int64_t D,  \
          int64_t k, void* dist, int64_t* index);                                                    \
  /* gaussian_nll: input, target [A*B*C], var [A*C] broadcast over B, in dt. Every gradient is      \
     multiplied by scale (1/N for the mean; 1 with a per-element go). grad: compute gradients.     \
     Returns the loss sum (double); *neg = 1 when a var entry is negative. */                       \
  double gaussian_nll(DType dt, const void* input, const void* target, const void* var, int64_t A,   \
                      int64_t B, int64_t C, bool full, double eps, bool log_var, double beta,        \
                      double scale, bool grad, const NllOuts& outs, int* neg);                       \
  /* spread_noise: y = x + sigma * eps, x and y [numel] in dt (sizes: x's nd sizes, nd <= 16);      \
     sigma in the accumulation type (float64 for kFloat64, else float32), contiguous, with         \
     sigma_sizes (nd entries, each 1 or sizes[d]) or sigma_sizes == null for one element.          \
     kind 0 gaussian, 1 laplace. */                                                                 \
  void spread_noise(DType dt, const void* x, void* y, const void* sigma, int nd, const int64_t* sizes, \
                    const int64_t* sigma_sizes, int64_t numel, int kind, int64_t seed, int64_t offset); \
  /* grad_sigma[k] = sum of eps_i grad_y_i over the elements i broadcast from sigma element k:      \
     out [prod(sigma_sizes)] float64 (written in full); sigma_sizes as above. */                    \
  void spread_noise_grad_sigma(DType dt, const void* grad_y, double* out, int nd, const int64_t* sizes, \
                               const int64_t* sigma_sizes, int64_t numel, int kind, int64_t seed,     \
                               int64_t offset);                                                      \
  /* spread_log_likelihood (dt kFloat32 or kFloat64): y [N,D], samples [S,D], sigma [sigma_numel]   \
     (1 or D elements), kind 0 gaussian / 1 laplace; out [N] in dt. */                              \
  void sll_forward(DType dt, const void* y, const void* samples, const void* sigma, int64_t sigma_numel, \
                   int kind, int64_t N, int64_t S, int64_t D, void* out);                            \
  /* backward: grad_out [N], out [N] (the forward's output) in dt; grad_y [N,D], grad_samples [S,D], \
     grad_sigma [sigma_numel] in dt, each null when not wanted. */                                  \
  void sll_backward(DType dt, const void* grad_out, const void* y, const void* samples, const void* sigma, \
                    int64_t sigma_numel, const void* out, int kind, int64_t N, int64_t S, int64_t D,  \
                    void* grad_y, void* grad_samples, void* grad_sigma);                             \
  /* vector math as the kernels use it, for the ulp tests: out[i] = f(x[i]), float32, n elements.   \
     fn: 0 exp (gaussian_nll), 1 log (gaussian_nll), 2 exp for x <= 0 (spread_log_likelihood),     \
     3 log on (0, 1] (spread_noise), 4 / 5 sin / cos(2 pi b 2^-32) of the uint32 bits b of x      \
     (spread_noise). Returns false for an unknown fn. */                                            \
  bool vmath(int fn, const float* x, float* out, int64_t n);

struct Kernels {
  const char* name;
  int (*knn)(DType, const void*, const void*, int64_t, int64_t, int64_t, int64_t, int64_t, void*, int64_t*);
  double (*gaussian_nll)(DType, const void*, const void*, const void*, int64_t, int64_t, int64_t, bool, double,
                         bool, double, double, bool, const NllOuts&, int*);
  void (*spread_noise)(DType, const void*, void*, const void*, int, const int64_t*, const int64_t*, int64_t, int,
                       int64_t, int64_t);
  void (*spread_noise_grad_sigma)(DType, const void*, double*, int, const int64_t*, const int64_t*, int64_t, int,
                                  int64_t, int64_t);
  void (*sll_forward)(DType, const void*, const void*, const void*, int64_t, int, int64_t, int64_t, int64_t, void*);
  void (*sll_backward)(DType, const void*, const void*, const void*, const void*, int64_t, const void*, int, int64_t,
                       int64_t, int64_t, void*, void*, void*);
  bool (*vmath)(int, const float*, float*, int64_t);
};

// The kernels of the path chosen at load time (FASTGEN_CPU_ISA, else the best the CPU runs).
// Throws std::runtime_error when FASTGEN_CPU_ISA is invalid or names a path this CPU / build cannot run.
const Kernels& kernels();
// The id (Isa) of that path; throws like kernels().
int isa_in_use();
// Tests and benchmarks only: run path `isa` from now on (-1: back to the load-time choice); not
// thread-safe against kernels running concurrently. Throws std::runtime_error when the path is
// not available. Returns the path now in use (or -1 when that is the load-time error).
int set_isa(int isa);
// Bit i set when path i (Isa) is built into this library and runs on this CPU.
int isa_available();

// Ask Linux for transparent huge pages on the 2 MiB-aligned interior of [p, p + bytes) (buffers of
// at least 8 MiB, before their first touch): first-touch faults of fresh 64 MiB outputs otherwise
// cost as much as the kernels themselves. Advice only; a no-op elsewhere.
void advise_huge_pages(void* p, int64_t bytes);

}  // namespace fastgen_cpu
