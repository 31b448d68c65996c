// spread_noise on CPU: the tensor boundary (argument checks, allocation, dtype switch, registration)
// of fastgen::_spread_noise_kernel / _spread_noise_grad_sigma_kernel. The compute code, the noise
// layout (Philox-4x32-10, shared with the Triton kernel) and the transforms are in
// csrc/cpu/spread_noise_kernel.h, compiled per instruction set (csrc/cpu/isa.cpp).
//
// sigma is read in place through its broadcast sizes (never expanded in memory). The backward
// regenerates eps from (seed, offset) and returns grad_sigma = sum(eps * grad_y) over the
// broadcast dimensions, in sigma's shape, float64 (the caller casts to sigma's dtype).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "kernels.h"

namespace {

void check_args(const at::Tensor& x, const at::Tensor& sigma, int64_t kind, const char* xname) {
  TORCH_CHECK(x.device().is_cpu(), "spread_noise (cpu): ", xname, " must be a CPU tensor");
  TORCH_CHECK(sigma.device().is_cpu(), "spread_noise (cpu): sigma must be a CPU tensor");
  TORCH_CHECK(kind == 0 || kind == 1, "spread_noise (cpu): kind must be 0 (gaussian) or 1 (laplace)");
  TORCH_CHECK(x.is_contiguous(), "spread_noise (cpu): ", xname, " must be contiguous");
  TORCH_CHECK(sigma.dim() == x.dim() || sigma.numel() == 1,
              "spread_noise (cpu): sigma must have as many dims as ", xname, " (or one element)");
  TORCH_CHECK(x.dim() <= 16, "spread_noise (cpu): at most 16 dims");
}

fastgen_cpu::DType dtype_of(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return fastgen_cpu::DType::kFloat32;
    case at::kDouble: return fastgen_cpu::DType::kFloat64;
    case at::kHalf: return fastgen_cpu::DType::kFloat16;
    case at::kBFloat16: return fastgen_cpu::DType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, "spread_noise (cpu): unsupported dtype ", st);
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor spread_noise_cpu(const at::Tensor& x, const at::Tensor& sigma_in, int64_t kind, int64_t seed,
                            int64_t offset) {
  check_args(x, sigma_in, kind, "x");
  const auto dt = dtype_of(x.scalar_type());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t numel = x.numel();
  if (numel == 0) return y;
  fastgen_cpu::advise_huge_pages(y.data_ptr(), numel * (int64_t)y.element_size());
  // sigma in the accumulation type, contiguous (no copy when it already is)
  at::Tensor sigma = sigma_in.to(acc_type(x.scalar_type())).contiguous();
  const bool scalar_sigma = sigma.numel() == 1;
  fastgen_cpu::kernels().spread_noise(dt, x.data_ptr(), y.data_ptr(), sigma.data_ptr(), (int)x.dim(),
                                      x.sizes().data(), scalar_sigma ? nullptr : sigma.sizes().data(), numel,
                                      (int)kind, seed, offset);
  return y;
}

// Returns grad_sigma in sigma's shape, float64 (the caller casts to sigma's dtype).
at::Tensor spread_noise_grad_sigma_cpu(const at::Tensor& grad_y, const at::Tensor& sigma, int64_t kind,
                                       int64_t seed, int64_t offset) {
  check_args(grad_y, sigma, kind, "grad_y");
  const auto dt = dtype_of(grad_y.scalar_type());
  at::Tensor out = at::zeros(sigma.sizes(), grad_y.options().dtype(at::kDouble));
  const int64_t numel = grad_y.numel();
  if (numel == 0) return out;
  fastgen_cpu::kernels().spread_noise_grad_sigma(dt, grad_y.data_ptr(), out.data_ptr<double>(), (int)grad_y.dim(),
                                                 grad_y.sizes().data(),
                                                 sigma.numel() == 1 ? nullptr : sigma.sizes().data(), numel,
                                                 (int)kind, seed, offset);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CPU, m) {
  m.impl("_spread_noise_kernel", &spread_noise_cpu);
  m.impl("_spread_noise_grad_sigma_kernel", &spread_noise_grad_sigma_cpu);
}
