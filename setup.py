"""Builds fastgen._C (C++ CPU kernels, OpenMP) and, when wanted, fastgen._C_cuda (CUDA kernels).

The CUDA kernels are a SEPARATE extension (csrc/cuda/*.cu + csrc/cuda/*.cpp): a CUDA build
failure never removes the CPU kernels of fastgen._C (the schemas live in csrc/fastgen.cpp).

Environment:
  FASTGEN_CUDA=auto|1|0   build fastgen._C_cuda. auto (default): when torch is a CUDA build, a
                          CUDA toolkit (CUDA_HOME / nvcc) is found and a GPU is visible (or
                          TORCH_CUDA_ARCH_LIST names the architectures); 1: always (an error when
                          torch or the toolkit cannot, with FASTGEN_REQUIRE_EXT=1, else a warning).
                          Architectures: TORCH_CUDA_ARCH_LIST (torch's default: the visible GPUs).
  FASTGEN_NATIVE=1|0      default 0: the CPU kernels are compiled once per instruction set
                          (csrc/cpu/isa/<op>_{baseline,avx2,avx512}.cpp: x86-64-v2, x86-64-v3,
                          x86-64-v4, switched by `#pragma GCC target` inside each file, see
                          csrc/cpu/isa_begin.h) and the path is chosen at load time from the CPU's
                          features (csrc/cpu/isa.cpp; FASTGEN_CPU_ISA=baseline|avx2|avx512 forces
                          one): one binary for every x86-64 CPU. 1: compile everything with
                          -march=native instead (one path, "native"; the binary runs only on
                          CPUs like the build machine's).
  FASTGEN_REQUIRE_EXT=1   fail the install if the extension does not build (default:
                          warn and install the pure torch / Triton package).

LibTorch stable ABI: fastgen._C (and fastgen._C_cuda) use only torch::stable / header-only APIs
and the stable C shim, compiled with TORCH_TARGET_VERSION = torch 2.10 (the oldest torch whose
stable API has everything the kernels use; pyproject's `torch>=` says the same) and
Py_LIMITED_API = CPython 3.10. `pip wheel --no-build-isolation --no-deps .` therefore makes one
cp310-abi3 wheel that loads into every torch >= 2.10 and CPython >= 3.10 (tools/check_wheel.sh).
"""
import glob
import os

from setuptools import setup

_ON = ("1", "true", "on", "yes")

# The stable-ABI contract of the compiled extensions (see the docstring): the oldest torch they
# load into (TORCH_TARGET_VERSION: major << 56 | minor << 48) and the oldest CPython (abi3 tag).
TORCH_TARGET = (2, 10)
PY_LIMITED = "cp310"
_STABLE_MACROS = [("TORCH_TARGET_VERSION", f"0x{(TORCH_TARGET[0] << 56) | (TORCH_TARGET[1] << 48):016x}")]


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install
        print("fastgen: torch not importable at build time; skipping fastgen._C")
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    # An in-place build from before the stable ABI left fastgen/_C*.cpython-*.so behind: Python
    # prefers that suffix to .abi3.so, so the stale library would shadow the new one.
    for stale in glob.glob(os.path.join(here, "fastgen", "_C*.cpython-*.so")):
        os.remove(stale)
    # CPU sources: the tensor boundaries csrc/cpu/<op>.cpp, the path selection csrc/cpu/isa.cpp,
    # and the compute code once per instruction set, csrc/cpu/isa/<op>_<isa>.cpp (each sets its
    # target with a pragma, so one flag set compiles them all; the avx2 / avx512 files are empty
    # off x86-64 and in a FASTGEN_NATIVE=1 build)
    sources = [os.path.relpath(p, here) for p in
               sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(here, "csrc", "cpu", "*.cpp")))
               + sorted(glob.glob(os.path.join(here, "csrc", "cpu", "isa", "*.cpp")))]
    # -g0: no debug info (Python's CFLAGS add -g: larger objects, slower compiles of the kernels)
    cxx = ["-O3", "-fopenmp", "-std=c++17", "-Wno-psabi", "-g0",
           # the wheel's glibc floor stays at or below torch's (manylinux_2_28): csrc/compat/
           "-include", os.path.join(here, "csrc", "compat", "glibc_compat.h")]
    if os.environ.get("FASTGEN_NATIVE", "0") == "1":
        cxx += ["-march=native", "-DFASTGEN_NATIVE_BUILD"]
    optional = os.environ.get("FASTGEN_REQUIRE_EXT", "0") != "1"
    exts = [cpp_extension.CppExtension(
        "fastgen._C", sources, extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"], optional=optional,
        include_dirs=[os.path.join(here, "csrc", "compat"), os.path.join(here, "csrc")], define_macros=_STABLE_MACROS, py_limited_api=True)]
    use_cuda, why = _want_cuda(torch, cpp_extension, optional)
    if use_cuda:
        cu_sources = [os.path.relpath(p, here) for p in
                      sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))
                      + sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cpp")))]
        # optional unless FASTGEN_CUDA=1 and FASTGEN_REQUIRE_EXT=1: a failed CUDA build warns and
        # leaves fastgen._C (built first) in place
        strict = not optional and os.environ.get("FASTGEN_CUDA", "auto").lower() in _ON
        exts.append(cpp_extension.CUDAExtension(
            "fastgen._C_cuda", cu_sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
            optional=not strict, include_dirs=[os.path.join(here, "csrc", "compat"), os.path.join(here, "csrc")],
            define_macros=_STABLE_MACROS + [("USE_CUDA", "1")], py_limited_api=True))
    print(f"fastgen: building fastgen._C (CPU, optional={optional}); fastgen._C_cuda: "
          + ("yes" if use_cuda else f"no ({why})"))
    return exts, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def _want_cuda(torch, cpp_extension, optional):
    """(build fastgen._C_cuda?, reason when not) from FASTGEN_CUDA, torch and the toolkit."""
    want = os.environ.get("FASTGEN_CUDA", "auto").lower()
    if want in ("0", "false", "off", "no"):
        return False, f"FASTGEN_CUDA={want}"
    missing = []
    if torch.version.cuda is None:
        missing.append("torch is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        missing.append("no CUDA toolkit (set CUDA_HOME or put nvcc on PATH)")
    if want in _ON:
        if missing:
            msg = "FASTGEN_CUDA=1 but " + "; ".join(missing)
            if not optional:
                raise RuntimeError(msg)
            print(f"fastgen: WARNING: {msg}: fastgen._C_cuda is not built")
            return False, msg
        return True, None
    if missing:
        return False, "; ".join(missing)
    if not (torch.cuda.is_available() or os.environ.get("TORCH_CUDA_ARCH_LIST")):
        return False, "no GPU visible and TORCH_CUDA_ARCH_LIST unset (FASTGEN_CUDA=1 forces the build)"
    return True, None


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass,
      # one cp310-abi3 wheel (the extensions are py_limited_api=True: torch's BuildExtension adds
      # -DPy_LIMITED_API=0x030a0000)
      options={"bdist_wheel": {"py_limited_api": PY_LIMITED}} if ext_modules else {})
