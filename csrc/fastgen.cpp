// fastgen._C: the one place where every op's schema is declared, on the LibTorch stable ABI.
// CPU kernels live in csrc/cpu/<op>.cpp and CUDA kernels in csrc/cuda/<op>.cu; each registers
// its implementation with STABLE_TORCH_LIBRARY_IMPL(fastgen, CPU|CUDA, m). These are internal
// kernels (underscore names, fake kernels in fastgen/ops/<op>.py); the public op of each function
// is a torch custom op defined in Python (fastgen/_compile.py). The Python layer
// (fastgen/ops/<op>.py) wraps these in autograd Functions and picks backends in
// fastgen/_dispatch.py.
//
// Stable ABI: only torch::stable / torch::headeronly and the stable C shim are used, compiled
// with TORCH_TARGET_VERSION = torch 2.10 and Py_LIMITED_API = 3.10 (setup.py), so one binary
// (a cp310-abi3 wheel) loads into every torch >= 2.10 and every CPython >= 3.10.
#include <Python.h>

#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(fastgen, m) {
  // ---- knn (csrc/cpu/knn.cpp) ----
  // query [B, N, D], key [B, M, D], one dtype: float32, float64, float16 or bfloat16; 1 <= k <= M.
  // Returns (dist2 [B, N, k] ascending, float64 for float64 inputs else float32; index [B, N, k] int64);
  // exact (certified fp32 fast pass + double re-rank): ties -> lowest index.
  m.def("_knn_kernel(Tensor query, Tensor key, int k) -> (Tensor, Tensor)");

  // ---- gaussian_nll (csrc/cpu/gaussian_nll.cpp) ----
  // input, target [A*B*C] contiguous, var [A*C] broadcast over B (index arithmetic, never
  // expanded); one dtype. reduction 0 none / 1 mean / 2 sum. Returns (loss, grad_input,
  // grad_target, grad_var, negative-var flag): gradients of the reduced loss computed in the same
  // pass when requested (empty otherwise, and always for "none": see gaussian_nll_backward).
  m.def("_gaussian_nll_kernel(Tensor input, Tensor target, Tensor var, int A, int B, int C, bool full, "
        "float eps, bool log_var, float beta, int reduction, bool grad_input, bool grad_target, "
        "bool grad_var) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Fused backward of reduction "none": grad_out [A*B*C] per element.
  m.def("_gaussian_nll_backward_kernel(Tensor grad_out, Tensor input, Tensor target, Tensor var, int A, "
        "int B, int C, bool full, float eps, bool log_var, float beta, bool grad_input, "
        "bool grad_target, bool grad_var) -> (Tensor, Tensor, Tensor)");

  // ---- spread_noise (csrc/cpu/spread_noise.cpp) ----
  m.def("_spread_noise_kernel(Tensor x, Tensor sigma, int kind, int seed, int offset) -> Tensor");
  m.def("_spread_noise_grad_sigma_kernel(Tensor grad_y, Tensor sigma, int kind, int seed, int offset) -> Tensor");

  // ---- spread_log_likelihood (csrc/cpu/spread_log_likelihood.cpp) ----
  // y [N, D], samples [S, D], sigma [1] or [D]: one dtype, float32 or float64, contiguous.
  // kind 0 gaussian / 1 laplace. Returns out [N]; the backward returns (grad_y, grad_samples,
  // grad_sigma), empty tensors where not requested.
  m.def("_spread_log_likelihood_kernel(Tensor y, Tensor samples, Tensor sigma, int kind) -> Tensor");
  m.def("_spread_log_likelihood_backward_kernel(Tensor grad_out, Tensor y, Tensor samples, Tensor sigma, "
        "Tensor out, int kind, bool need_y, bool need_samples, bool need_sigma) -> (Tensor, Tensor, Tensor)");

  // ---- CPU paths (csrc/cpu/isa.cpp, csrc/cpu/isa_ops.cpp) ----
  // The path the CPU kernels run: 0 baseline, 1 avx2, 2 avx512, 3 native (FASTGEN_NATIVE=1 build);
  // RuntimeError when FASTGEN_CPU_ISA names a path this CPU cannot run.
  m.def("_cpu_isa_kernel() -> int");
  // Bit i set when path i is built into this library and runs on this CPU.
  m.def("_cpu_isa_available_kernel() -> int");
  // Tests and benchmarks only: run path isa from now on (-1: the load-time choice again); returns
  // the path now in use. RuntimeError when the path is not built or the CPU lacks it.
  m.def("_cpu_isa_set_kernel(int isa) -> int");
  // The kernels' vector math on float32 x (fn 0 exp, 1 log, 2 exp on x <= 0, 3 log on (0, 1],
  // 4 / 5 sin / cos(2 pi b 2^-32) of x's bits), on the path in use: for the ulp tests.
  m.def("_cpu_vmath_kernel(Tensor x, int fn) -> Tensor");
}

// fastgen._C is also a Python module so that `import fastgen._C` loads the library above (its
// static initialisers register the ops with torch's dispatcher). Limited API only: no pybind11,
// no libtorch_python. The ops are torch.ops.fastgen.*.
static PyModuleDef fastgen_module = {
    PyModuleDef_HEAD_INIT, "_C", "fastgen compiled CPU kernels; ops are exposed as torch.ops.fastgen.*",
    -1, nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&fastgen_module); }
