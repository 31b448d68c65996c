// spread_noise on CPU: the tensor boundary (argument checks, allocation, dtype switch, registration)
// of fastgen::_spread_noise_kernel / _spread_noise_grad_sigma_kernel, on the LibTorch stable ABI.
// The compute code, the noise layout (Philox-4x32-10, shared with the Triton kernel) and the
// transforms are in csrc/cpu/spread_noise_kernel.h, compiled per instruction set (csrc/cpu/isa.cpp).
//
// sigma is read in place through its broadcast sizes (never expanded in memory). The backward
// regenerates eps from (seed, offset) and returns grad_sigma = sum(eps * grad_y) over the
// broadcast dimensions, in sigma's shape, float64 (the caller casts to sigma's dtype).
#include <cstdint>

#include "boundary.h"

namespace {

using fastgen::ScalarType;
using fastgen::Tensor;

void check_args(const Tensor& x, const Tensor& sigma, int64_t kind, const char* xname) {
  FG_CHECK(x.is_cpu(), "spread_noise (cpu): ", xname, " must be a CPU tensor");
  FG_CHECK(sigma.is_cpu(), "spread_noise (cpu): sigma must be a CPU tensor");
  FG_CHECK(kind == 0 || kind == 1, "spread_noise (cpu): kind must be 0 (gaussian) or 1 (laplace)");
  FG_CHECK(x.is_contiguous(), "spread_noise (cpu): ", xname, " must be contiguous");
  FG_CHECK(sigma.dim() == x.dim() || sigma.numel() == 1,
           "spread_noise (cpu): sigma must have as many dims as ", xname, " (or one element)");
  FG_CHECK(x.dim() <= 16, "spread_noise (cpu): at most 16 dims");
  if (sigma.numel() != 1)  // the kernel reads sigma through broadcast strides: sizes 1 or x's
    for (int64_t d = 0; d < x.dim(); ++d)
      FG_CHECK(sigma.size(d) == 1 || sigma.size(d) == x.size(d), "spread_noise (cpu): sigma's size ", sigma.size(d),
               " at dim ", d, " does not broadcast to ", xname, "'s ", x.size(d));
}

ScalarType acc_type(ScalarType t) { return t == fastgen::kDouble ? fastgen::kDouble : fastgen::kFloat; }

Tensor spread_noise_cpu(Tensor x, Tensor sigma_in, int64_t kind, int64_t seed, int64_t offset) {
  check_args(x, sigma_in, kind, "x");
  const auto dt = fastgen::kernel_dtype(x.scalar_type(), "spread_noise (cpu)");
  Tensor y = fastgen::empty_huge(x, fastgen::sizes_of(x), x.scalar_type());  // 2 MiB-aligned huge pages when large
  const int64_t numel = x.numel();
  if (numel == 0) return y;
  // sigma in the accumulation type, contiguous (no copy when it already is)
  const Tensor sigma = torch::stable::contiguous(torch::stable::to(sigma_in, acc_type(x.scalar_type())));
  const bool scalar_sigma = sigma.numel() == 1;
  fastgen_cpu::kernels().spread_noise(dt, x.const_data_ptr(), y.mutable_data_ptr(), sigma.const_data_ptr(),
                                      (int)x.dim(), x.sizes().data(), scalar_sigma ? nullptr : sigma.sizes().data(),
                                      numel, (int)kind, seed, offset);
  return y;
}

// Returns grad_sigma in sigma's shape, float64 (the caller casts to sigma's dtype).
Tensor spread_noise_grad_sigma_cpu(Tensor grad_y, Tensor sigma, int64_t kind, int64_t seed, int64_t offset) {
  check_args(grad_y, sigma, kind, "grad_y");
  const auto dt = fastgen::kernel_dtype(grad_y.scalar_type(), "spread_noise (cpu)");
  Tensor out = fastgen::zeros(grad_y, fastgen::sizes_of(sigma), fastgen::kDouble);
  const int64_t numel = grad_y.numel();
  if (numel == 0) return out;
  fastgen_cpu::kernels().spread_noise_grad_sigma(dt, grad_y.const_data_ptr(), out.mutable_data_ptr<double>(),
                                                 (int)grad_y.dim(), grad_y.sizes().data(),
                                                 sigma.numel() == 1 ? nullptr : sigma.sizes().data(), numel,
                                                 (int)kind, seed, offset);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_spread_noise_kernel", TORCH_BOX(&spread_noise_cpu));
  m.impl("_spread_noise_grad_sigma_kernel", TORCH_BOX(&spread_noise_grad_sigma_cpu));
}
