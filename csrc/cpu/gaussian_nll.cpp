// Fused Gaussian negative log-likelihood on CPU: the tensor boundary (argument checks, allocation,
// dtype switch, registration) of fastgen::_gaussian_nll_kernel / _gaussian_nll_backward_kernel, on
// the LibTorch stable ABI. The compute code and the mathematics: csrc/cpu/gaussian_nll_kernel.h
// (one pass over memory, compiled per instruction set, called through the table of
// csrc/cpu/isa.cpp).
//
// The problem is viewed as [A, B, C] (contiguous input / target / loss) with var [A, C] broadcast
// over B. gaussian_nll_cpu returns (loss, grad_input, grad_target, grad_var, negative-var flag):
// the loss (0-d sum / mean, or [A*B*C] for reduction "none"), the gradients of the reduced loss
// when asked (computed in the same pass, scaled by 1/N for the mean; empty otherwise), and a 0-d
// int32 flag set when var has a negative entry. gaussian_nll_backward_cpu is the fused pass for
// reduction "none" (per-element grad_output).
#include <cstdint>
#include <tuple>

#include "boundary.h"

namespace {

using fastgen::ScalarType;
using fastgen::Tensor;

void check_args(const Tensor& x, const Tensor& t, const Tensor& v, int64_t A, int64_t B, int64_t C) {
  FG_CHECK_VALUE(A >= 1 && B >= 1 && C >= 1, "gaussian_nll: A, B, C must be >= 1");
  FG_CHECK_VALUE(x.numel() == A * B * C, "gaussian_nll: input must have A*B*C elements");
  FG_CHECK_VALUE(t.numel() == A * B * C, "gaussian_nll: target must have A*B*C elements");
  FG_CHECK_VALUE(v.numel() == A * C, "gaussian_nll: var must have A*C elements");
  FG_CHECK_VALUE(t.scalar_type() == x.scalar_type() && v.scalar_type() == x.scalar_type(),
                 "gaussian_nll: input, target and var must have one dtype");
  FG_CHECK_VALUE(x.is_contiguous() && t.is_contiguous() && v.is_contiguous(),
                 "gaussian_nll: input, target and var must be contiguous");
  FG_CHECK_VALUE(x.is_cpu() && t.is_cpu() && v.is_cpu(), "gaussian_nll: CPU tensors expected");
}

// Outputs: 2 MiB-aligned with transparent huge pages when large (fastgen::empty_huge).
Tensor alloc_out(const Tensor& like, int64_t numel, ScalarType dtype) { return fastgen::empty_huge(like, {numel}, dtype); }

// reduction: 0 none, 1 mean, 2 sum.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> gaussian_nll_cpu(
    Tensor input, Tensor target, Tensor var, int64_t A, int64_t B, int64_t C, bool full, double eps, bool log_var,
    double beta, int64_t reduction, bool grad_input, bool grad_target, bool grad_var) {
  check_args(input, target, var, A, B, C);
  FG_CHECK_VALUE(reduction >= 0 && reduction <= 2, "gaussian_nll: reduction must be 0, 1 or 2");
  const auto dt = fastgen::kernel_dtype(input.scalar_type(), "gaussian_nll");
  const ScalarType st = input.scalar_type();
  const int64_t N = A * B * C;
  const bool none = reduction == 0;
  // For "none", gradients need the per-element grad_output: gaussian_nll_backward computes them.
  const bool grad = !none && (grad_input || grad_target || grad_var);
  Tensor loss = none ? alloc_out(input, N, st) : Tensor();
  Tensor gin = grad && grad_input ? alloc_out(input, N, st) : fastgen::none(input, st);
  Tensor gt = grad && grad_target ? alloc_out(input, N, st) : fastgen::none(input, st);
  Tensor gv = grad && grad_var ? alloc_out(input, A * C, st) : fastgen::none(input, st);
  fastgen_cpu::NllOuts o{none ? loss.mutable_data_ptr() : nullptr,
                         grad && grad_input ? gin.mutable_data_ptr() : nullptr,
                         grad && grad_target ? gt.mutable_data_ptr() : nullptr,
                         grad && grad_var ? gv.mutable_data_ptr() : nullptr, nullptr};
  const double scale = reduction == 1 ? 1.0 / (double)N : 1.0;
  int neg = 0;
  const double total =
      fastgen_cpu::kernels().gaussian_nll(dt, input.const_data_ptr(), target.const_data_ptr(), var.const_data_ptr(),
                                          A, B, C, full, eps, log_var, beta, scale, grad, o, &neg);
  if (!none) loss = fastgen::scalar_tensor(input, reduction == 1 ? total / (double)N : total, st);
  Tensor flag = fastgen::scalar_tensor(input, neg ? 1.0 : 0.0, fastgen::kInt);
  return {loss, gin, gt, gv, flag};
}

std::tuple<Tensor, Tensor, Tensor> gaussian_nll_backward_cpu(Tensor grad_out, Tensor input, Tensor target,
                                                             Tensor var, int64_t A, int64_t B, int64_t C, bool full,
                                                             double eps, bool log_var, double beta, bool grad_input,
                                                             bool grad_target, bool grad_var) {
  check_args(input, target, var, A, B, C);
  const int64_t N = A * B * C;
  FG_CHECK_VALUE(grad_out.numel() == N && grad_out.is_contiguous() && grad_out.scalar_type() == input.scalar_type(),
                 "gaussian_nll_backward: grad_out must be contiguous, with N elements and input's dtype");
  const auto dt = fastgen::kernel_dtype(input.scalar_type(), "gaussian_nll");
  const ScalarType st = input.scalar_type();
  Tensor gin = grad_input ? alloc_out(input, N, st) : fastgen::none(input, st);
  Tensor gt = grad_target ? alloc_out(input, N, st) : fastgen::none(input, st);
  Tensor gv = grad_var ? alloc_out(input, A * C, st) : fastgen::none(input, st);
  fastgen_cpu::NllOuts o{nullptr, grad_input ? gin.mutable_data_ptr() : nullptr,
                         grad_target ? gt.mutable_data_ptr() : nullptr, grad_var ? gv.mutable_data_ptr() : nullptr,
                         grad_out.const_data_ptr()};
  int neg = 0;
  fastgen_cpu::kernels().gaussian_nll(dt, input.const_data_ptr(), target.const_data_ptr(), var.const_data_ptr(), A, B,
                                      C, full, eps, log_var, beta, 1.0, true, o, &neg);
  return {gin, gt, gv};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_gaussian_nll_kernel", TORCH_BOX(&gaussian_nll_cpu));
  m.impl("_gaussian_nll_backward_kernel", TORCH_BOX(&gaussian_nll_backward_cpu));
}
