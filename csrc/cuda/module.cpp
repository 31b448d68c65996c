// fastgen._C_cuda: the CUDA kernels of fastgen as a separate, optional extension module.
// Importing it loads the library, whose static TORCH_LIBRARY_IMPL(fastgen, CUDA, m) blocks
// (csrc/cuda/*.cu) register CUDA kernels for the schemas declared in csrc/fastgen.cpp (fastgen._C,
// loaded first by fastgen/_backend.py). A CUDA build failure therefore never removes the CPU
// kernels of fastgen._C. No Python functions: the ops are torch.ops.fastgen.*.
#include <Python.h>

static PyModuleDef fastgen_cuda_module = {
    PyModuleDef_HEAD_INIT, "_C_cuda",
    "fastgen CUDA kernels; ops are exposed as torch.ops.fastgen.* (CUDA dispatch key)", -1, nullptr,
    nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C_cuda(void) {
  PyObject* m = PyModule_Create(&fastgen_cuda_module);
  if (m != nullptr) {
    Py_INCREF(Py_True);
    if (PyModule_AddObject(m, "with_cuda", Py_True) < 0) Py_DECREF(Py_True);
  }
  return m;
}
