// spread_log_likelihood on CPU: the tensor boundary (argument checks, allocation, dtype switch,
// registration) of fastgen::_spread_log_likelihood_kernel / _spread_log_likelihood_backward_kernel,
// on the LibTorch stable ABI. The compute code and the mathematics (exact direct differences,
// online logsumexp, fused backward): csrc/cpu/spread_log_likelihood_kernel.h, compiled per
// instruction set and called through the table of csrc/cpu/isa.cpp.
//
//   out[n] = log( 1/S sum_s K_sigma(y_n - x_s) ),  y [N, D], x = samples [S, D], sigma [1] or [D]
#include <cstdint>
#include <tuple>

#include "boundary.h"

namespace {

using fastgen::Tensor;

void check_inputs(const Tensor& y, const Tensor& x, const Tensor& sigma, int64_t kind) {
  FG_CHECK(y.is_cpu() && x.is_cpu() && sigma.is_cpu(), "spread_log_likelihood (cpu): tensors must be on the CPU");
  FG_CHECK(y.dim() == 2 && x.dim() == 2 && y.size(1) == x.size(1),
           "spread_log_likelihood (cpu): y [N, D] and samples [S, D] expected");
  FG_CHECK(y.scalar_type() == x.scalar_type() && y.scalar_type() == sigma.scalar_type() &&
               (y.scalar_type() == fastgen::kFloat || y.scalar_type() == fastgen::kDouble),
           "spread_log_likelihood (cpu): y, samples, sigma must share dtype float32 or float64");
  FG_CHECK(y.is_contiguous() && x.is_contiguous() && sigma.is_contiguous(),
           "spread_log_likelihood (cpu): contiguous inputs expected");
  FG_CHECK(sigma.numel() == 1 || (sigma.dim() == 1 && sigma.size(0) == y.size(1)),
           "spread_log_likelihood (cpu): sigma must have 1 or D elements");
  FG_CHECK(kind == 0 || kind == 1, "spread_log_likelihood (cpu): kind must be 0 or 1");
  FG_CHECK(y.size(0) > 0 && x.size(0) > 0 && y.size(1) > 0, "spread_log_likelihood (cpu): empty input");
}

// Returns out [N] (y's dtype).
Tensor sll_forward_cpu(Tensor y, Tensor samples, Tensor sigma, int64_t kind) {
  check_inputs(y, samples, sigma, kind);
  const int64_t N = y.size(0), S = samples.size(0), D = y.size(1);
  Tensor out = fastgen::empty(y, {N}, y.scalar_type());
  fastgen_cpu::kernels().sll_forward(fastgen::kernel_dtype(y.scalar_type(), "spread_log_likelihood (cpu)"), y.const_data_ptr(), samples.const_data_ptr(),
                                     sigma.const_data_ptr(), sigma.numel(), (int)kind, N, S, D,
                                     out.mutable_data_ptr());
  return out;
}

// Returns (grad_y, grad_samples, grad_sigma); empty tensors where not requested.
// grad_sigma has sigma's shape ([1] or [D]).
std::tuple<Tensor, Tensor, Tensor> sll_backward_cpu(Tensor grad_out, Tensor y, Tensor samples, Tensor sigma,
                                                    Tensor out, int64_t kind, bool need_y, bool need_samples,
                                                    bool need_sigma) {
  check_inputs(y, samples, sigma, kind);
  const int64_t N = y.size(0), S = samples.size(0), D = y.size(1);
  FG_CHECK(grad_out.numel() == N && out.numel() == N, "spread_log_likelihood (cpu): grad_out, out must be [N]");
  const auto st = y.scalar_type();
  const Tensor g = torch::stable::contiguous(torch::stable::to(grad_out, st));
  const Tensor o = torch::stable::contiguous(torch::stable::to(out, st));
  // unrequested gradients come back as empty tensors (the op schema returns three Tensors)
  Tensor gy = need_y ? fastgen::empty(y, {N, D}, st) : fastgen::none(y, st);
  Tensor gx = need_samples ? fastgen::empty(y, {S, D}, st) : fastgen::none(y, st);
  Tensor gsig = need_sigma ? fastgen::empty(y, fastgen::sizes_of(sigma), st) : fastgen::none(y, st);
  fastgen_cpu::kernels().sll_backward(fastgen::kernel_dtype(y.scalar_type(), "spread_log_likelihood (cpu)"), g.const_data_ptr(), y.const_data_ptr(), samples.const_data_ptr(),
                                      sigma.const_data_ptr(), sigma.numel(), o.const_data_ptr(), (int)kind, N, S, D,
                                      need_y ? gy.mutable_data_ptr() : nullptr,
                                      need_samples ? gx.mutable_data_ptr() : nullptr,
                                      need_sigma ? gsig.mutable_data_ptr() : nullptr);
  return {gy, gx, gsig};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_spread_log_likelihood_kernel", TORCH_BOX(&sll_forward_cpu));
  m.impl("_spread_log_likelihood_backward_kernel", TORCH_BOX(&sll_backward_cpu));
}
