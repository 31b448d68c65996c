// spread_log_likelihood on CPU: the tensor boundary (argument checks, allocation, dtype switch,
// registration) of fastgen::_spread_log_likelihood_kernel / _spread_log_likelihood_backward_kernel.
// The compute code and the mathematics (exact direct differences, online logsumexp, fused
// backward): csrc/cpu/spread_log_likelihood_kernel.h, compiled per instruction set and called
// through the table of csrc/cpu/isa.cpp.
//
//   out[n] = log( 1/S sum_s K_sigma(y_n - x_s) ),  y [N, D], x = samples [S, D], sigma [1] or [D]
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "kernels.h"

namespace {

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

fastgen_cpu::DType dtype_of(const at::Tensor& y) {
  return y.scalar_type() == at::kDouble ? fastgen_cpu::DType::kFloat64 : fastgen_cpu::DType::kFloat32;
}

// Returns out [N] (y's dtype).
at::Tensor sll_forward_cpu(const at::Tensor& y, const at::Tensor& samples, const at::Tensor& sigma, int64_t kind) {
  check_inputs(y, samples, sigma, kind);
  const int64_t N = y.size(0), S = samples.size(0), D = y.size(1);
  at::Tensor out = at::empty({N}, y.options());
  fastgen_cpu::kernels().sll_forward(dtype_of(y), y.data_ptr(), samples.data_ptr(), sigma.data_ptr(), sigma.numel(),
                                     (int)kind, N, S, D, out.data_ptr());
  return out;
}

// Returns (grad_y, grad_samples, grad_sigma); empty tensors where not requested.
// grad_sigma has sigma's shape ([1] or [D]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sll_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& y, const at::Tensor& samples, const at::Tensor& sigma,
    const at::Tensor& out, int64_t kind, bool need_y, bool need_samples, bool need_sigma) {
  check_inputs(y, samples, sigma, kind);
  const int64_t N = y.size(0), S = samples.size(0), D = y.size(1);
  TORCH_CHECK(grad_out.numel() == N && out.numel() == N, "spread_log_likelihood (cpu): grad_out, out must be [N]");
  const at::Tensor g = grad_out.to(y.scalar_type()).contiguous();
  const at::Tensor o = out.to(y.scalar_type()).contiguous();
  // unrequested gradients come back as empty tensors (the op schema returns three Tensors)
  at::Tensor gy = need_y ? at::empty({N, D}, y.options()) : at::empty({0}, y.options());
  at::Tensor gx = need_samples ? at::empty({S, D}, y.options()) : at::empty({0}, y.options());
  at::Tensor gsig = need_sigma ? at::empty(sigma.sizes(), y.options()) : at::empty({0}, y.options());
  fastgen_cpu::kernels().sll_backward(dtype_of(y), g.data_ptr(), y.data_ptr(), samples.data_ptr(), sigma.data_ptr(),
                                      sigma.numel(), o.data_ptr(), (int)kind, N, S, D,
                                      need_y ? gy.data_ptr() : nullptr, need_samples ? gx.data_ptr() : nullptr,
                                      need_sigma ? gsig.data_ptr() : nullptr);
  return {gy, gx, gsig};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_spread_log_likelihood_kernel", &sll_forward_cpu);
  m.impl("_spread_log_likelihood_backward_kernel", &sll_backward_cpu);
}
