// The tensor boundary of the CPU-path ops (schemas in csrc/fastgen.cpp), on the LibTorch stable ABI:
//   _cpu_isa_kernel() -> int: the path in use (0 baseline, 1 avx2, 2 avx512, 3 native); raises
//       RuntimeError when FASTGEN_CPU_ISA names a path this CPU / build cannot run.
//   _cpu_isa_available_kernel() -> int: bit i set when path i is built and runs on this CPU.
//   _cpu_isa_set_kernel(int isa) -> int: tests / benchmarks only: run path isa from now on (-1: the
//       load-time choice again); RuntimeError when that path is not available. Returns the path now
//       in use.
//   _cpu_vmath_kernel(Tensor x, int fn) -> Tensor: the kernels' vector math on float32 x, on the
//       path in use (fn: see kernels.h), for the ulp tests.
#include <cstdint>

#include "boundary.h"

namespace {

using fastgen::Tensor;

int64_t cpu_isa() { return fastgen_cpu::isa_in_use(); }

int64_t cpu_isa_available() { return fastgen_cpu::isa_available(); }

int64_t cpu_isa_set(int64_t isa) { return fastgen_cpu::set_isa((int)isa); }

Tensor cpu_vmath(Tensor x, int64_t fn) {
  FG_CHECK(x.scalar_type() == fastgen::kFloat, "_cpu_vmath_kernel: x must be float32");
  FG_CHECK_VALUE(x.is_cpu(), "_cpu_vmath_kernel: x must be a CPU tensor");
  const Tensor xc = torch::stable::contiguous(x);
  Tensor out = fastgen::empty(xc, fastgen::sizes_of(xc), fastgen::kFloat);
  const bool ok = fastgen_cpu::kernels().vmath((int)fn, xc.const_data_ptr<float>(), out.mutable_data_ptr<float>(),
                                               xc.numel());
  FG_CHECK_VALUE(ok, "_cpu_vmath_kernel: unknown fn ", fn);
  return out;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(fastgen, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa_kernel", TORCH_BOX(&cpu_isa));
  m.impl("_cpu_isa_available_kernel", TORCH_BOX(&cpu_isa_available));
  m.impl("_cpu_isa_set_kernel", TORCH_BOX(&cpu_isa_set));
}

STABLE_TORCH_LIBRARY_IMPL(fastgen, CPU, m) { m.impl("_cpu_vmath_kernel", TORCH_BOX(&cpu_vmath)); }
