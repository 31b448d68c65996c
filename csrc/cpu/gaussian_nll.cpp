// Fused Gaussian negative log-likelihood on CPU: the tensor boundary (argument checks, allocation,
// dtype switch, registration) of fastgen::_gaussian_nll_kernel / _gaussian_nll_backward_kernel.
// The compute code and the mathematics: csrc/cpu/gaussian_nll_kernel.h (one pass over memory,
// compiled per instruction set, called through the table of csrc/cpu/isa.cpp).
//
// The problem is viewed as [A, B, C] (contiguous input / target / loss) with var [A, C] broadcast
// over B. gaussian_nll_cpu returns (loss, grad_input, grad_target, grad_var, negative-var flag):
// the loss (0-d sum / mean, or [A*B*C] for reduction "none"), the gradients of the reduced loss
// when asked (computed in the same pass, scaled by 1/N for the mean; empty otherwise), and a 0-d
// int32 flag set when var has a negative entry. gaussian_nll_backward_cpu is the fused pass for
// reduction "none" (per-element grad_output).
#include <ATen/ATen.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <cstdlib>

#include <cstdint>
#include <tuple>

#include "kernels.h"

namespace {

void check_args(const at::Tensor& x, const at::Tensor& t, const at::Tensor& v, int64_t A, int64_t B, int64_t C) {
  TORCH_CHECK_VALUE(A >= 1 && B >= 1 && C >= 1, "gaussian_nll: A, B, C must be >= 1");
  TORCH_CHECK_VALUE(x.numel() == A * B * C, "gaussian_nll: input must have A*B*C elements");
  TORCH_CHECK_VALUE(t.numel() == A * B * C, "gaussian_nll: target must have A*B*C elements");
  TORCH_CHECK_VALUE(v.numel() == A * C, "gaussian_nll: var must have A*C elements");
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type() && v.scalar_type() == x.scalar_type(),
                   "gaussian_nll: input, target and var must have one dtype");
  TORCH_CHECK_VALUE(x.is_contiguous() && t.is_contiguous() && v.is_contiguous(),
                    "gaussian_nll: input, target and var must be contiguous");
  TORCH_CHECK_VALUE(x.device().is_cpu() && t.device().is_cpu() && v.device().is_cpu(),
                    "gaussian_nll: CPU tensors expected");
}

fastgen_cpu::DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return fastgen_cpu::DType::kFloat32;
    case at::kDouble: return fastgen_cpu::DType::kFloat64;
    case at::kHalf: return fastgen_cpu::DType::kFloat16;
    case at::kBFloat16: return fastgen_cpu::DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "gaussian_nll: unsupported dtype ", st);
  }
}

// Output buffers of 8 MiB or more are 2 MiB-aligned and advised as transparent huge pages:
// a fresh 64 MiB gradient otherwise costs more in 4 KiB page faults on first touch than the
// whole fused pass (measured: 36 ms vs 12 ms to fill 64 MiB on this 2-core machine). This
// is what torch's own CPU allocator does under THP_MEM_ALLOC_ENABLE=1.
at::Tensor alloc_out(int64_t numel, const at::TensorOptions& opts) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t bytes = (size_t)numel * c10::elementSize(c10::typeMetaToScalarType(opts.dtype()));
  if (bytes >= 4 * kHuge) {
    const size_t sz = (bytes + kHuge - 1) / kHuge * kHuge;
    void* ptr = nullptr;
    if (posix_memalign(&ptr, kHuge, sz) == 0) {
      madvise(ptr, sz, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
      return at::from_blob(ptr, {numel}, [](void* q) { std::free(q); }, opts);
    }
  }
#endif
  return at::empty({numel}, opts);
}

// reduction: 0 none, 1 mean, 2 sum.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_nll_cpu(
    const at::Tensor& input, const at::Tensor& target, const at::Tensor& var, int64_t A, int64_t B, int64_t C,
    bool full, double eps, bool log_var, double beta, int64_t reduction, bool grad_input, bool grad_target,
    bool grad_var) {
  check_args(input, target, var, A, B, C);
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "gaussian_nll: reduction must be 0, 1 or 2");
  const int64_t N = A * B * C;
  const bool none = reduction == 0;
  // For "none", gradients need the per-element grad_output: gaussian_nll_backward computes them.
  const bool grad = !none && (grad_input || grad_target || grad_var);
  auto opts = input.options();
  at::Tensor loss = none ? alloc_out(N, opts) : at::Tensor();
  at::Tensor gin = grad && grad_input ? alloc_out(N, opts) : at::empty({0}, opts);
  at::Tensor gt = grad && grad_target ? alloc_out(N, opts) : at::empty({0}, opts);
  at::Tensor gv = grad && grad_var ? alloc_out(A * C, opts) : at::empty({0}, opts);
  fastgen_cpu::NllOuts o{none ? loss.data_ptr() : nullptr, grad && grad_input ? gin.data_ptr() : nullptr,
         grad && grad_target ? gt.data_ptr() : nullptr, grad && grad_var ? gv.data_ptr() : nullptr, nullptr};
  const double scale = reduction == 1 ? 1.0 / (double)N : 1.0;
  int neg = 0;
  double total = 0.0;
  const auto dt = dtype_of(input.scalar_type());
  total = fastgen_cpu::kernels().gaussian_nll(dt, input.data_ptr(), target.data_ptr(), var.data_ptr(), A, B, C, full,
                                              eps, log_var, beta, scale, grad, o, &neg);
  if (!none) loss = at::scalar_tensor(reduction == 1 ? total / (double)N : total, opts);
  at::Tensor flag = at::scalar_tensor(neg ? 1 : 0, input.options().dtype(at::kInt));
  return {loss, gin, gt, gv, flag};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_nll_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& target, const at::Tensor& var,
    int64_t A, int64_t B, int64_t C, bool full, double eps, bool log_var, double beta, bool grad_input,
    bool grad_target, bool grad_var) {
  check_args(input, target, var, A, B, C);
  const int64_t N = A * B * C;
  TORCH_CHECK_VALUE(grad_out.numel() == N && grad_out.is_contiguous() &&
                        grad_out.scalar_type() == input.scalar_type(),
                    "gaussian_nll_backward: grad_out must be contiguous, with N elements and input's dtype");
  auto opts = input.options();
  at::Tensor gin = grad_input ? alloc_out(N, opts) : at::empty({0}, opts);
  at::Tensor gt = grad_target ? alloc_out(N, opts) : at::empty({0}, opts);
  at::Tensor gv = grad_var ? alloc_out(A * C, opts) : at::empty({0}, opts);
  fastgen_cpu::NllOuts o{nullptr, grad_input ? gin.data_ptr() : nullptr, grad_target ? gt.data_ptr() : nullptr,
         grad_var ? gv.data_ptr() : nullptr, grad_out.data_ptr()};
  int neg = 0;
  const auto dt = dtype_of(input.scalar_type());
  fastgen_cpu::kernels().gaussian_nll(dt, input.data_ptr(), target.data_ptr(), var.data_ptr(), A, B, C, full, eps,
                                      log_var, beta, 1.0, true, o, &neg);
  return {gin, gt, gv};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_gaussian_nll_kernel", &gaussian_nll_cpu);
  m.impl("_gaussian_nll_backward_kernel", &gaussian_nll_backward_cpu);
}
