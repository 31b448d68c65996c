// The tensor boundary of the CPU-path ops (schemas in csrc/fastgen.cpp):
//   _cpu_isa_kernel() -> int: the path in use (0 baseline, 1 avx2, 2 avx512, 3 native); raises
//       RuntimeError when FASTGEN_CPU_ISA names a path this CPU / build cannot run.
//   _cpu_isa_available_kernel() -> int: bit i set when path i is built and runs on this CPU.
//   _cpu_isa_set_kernel(int isa) -> int: tests / benchmarks only: run path isa from now on (-1: the
//       load-time choice again); RuntimeError when that path is not available. Returns the path now
//       in use.
//   _cpu_vmath_kernel(Tensor x, int fn) -> Tensor: the kernels' vector math on float32 x, on the
//       path in use (fn: see kernels.h), for the ulp tests.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>

#include "kernels.h"

namespace {

int64_t cpu_isa() { return fastgen_cpu::isa_in_use(); }

int64_t cpu_isa_available() { return fastgen_cpu::isa_available(); }

int64_t cpu_isa_set(int64_t isa) { return fastgen_cpu::set_isa((int)isa); }

at::Tensor cpu_vmath(const at::Tensor& x, int64_t fn) {
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, "_cpu_vmath_kernel: x must be float32");
  TORCH_CHECK_VALUE(x.device().is_cpu(), "_cpu_vmath_kernel: x must be a CPU tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const bool ok = fastgen_cpu::kernels().vmath((int)fn, xc.data_ptr<float>(), out.data_ptr<float>(), xc.numel());
  TORCH_CHECK_VALUE(ok, "_cpu_vmath_kernel: unknown fn ", fn);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgen, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa_kernel", &cpu_isa);
  m.impl("_cpu_isa_available_kernel", &cpu_isa_available);
  m.impl("_cpu_isa_set_kernel", &cpu_isa_set);
}

TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("_cpu_vmath_kernel", &cpu_vmath); }
