"""Builds fastgen._C: C++ CPU kernels (OpenMP) and, when available, CUDA kernels.

Environment:
  FASTGEN_CUDA=auto|1|0   build the CUDA kernels (auto: when torch is a CUDA build and
                          a CUDA toolkit is found).
  FASTGEN_NATIVE=1|0      compile the CPU kernels with -march=native (default 1: the
                          package is built from source on the machine that runs it).
  FASTGEN_REQUIRE_EXT=1   fail the install if the extension does not build (default:
                          warn and install the pure torch / Triton package).
"""
import glob
import os

from setuptools import setup


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # no torch at build time: pure-Python install
        print("fastgen: torch not importable at build time; skipping fastgen._C")
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.relpath(p, here) for p in
               sorted(glob.glob(os.path.join(here, "csrc", "*.cpp")))
               + sorted(glob.glob(os.path.join(here, "csrc", "cpu", "*.cpp")))]
    cxx = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("FASTGEN_NATIVE", "1") == "1":
        cxx.append("-march=native")
    want_cuda = os.environ.get("FASTGEN_CUDA", "auto").lower()
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda in ("1", "true", "on") and not has_cuda:
        raise RuntimeError("FASTGEN_CUDA=1 but torch is not a CUDA build or no CUDA toolkit was found")
    use_cuda = has_cuda and want_cuda not in ("0", "false", "off")
    optional = os.environ.get("FASTGEN_REQUIRE_EXT", "0") != "1"
    if use_cuda:
        sources += [os.path.relpath(p, here) for p in sorted(glob.glob(os.path.join(here, "csrc", "cuda", "*.cu")))]
        ext = cpp_extension.CUDAExtension(
            "fastgen._C", sources,
            extra_compile_args={"cxx": cxx + ["-DFASTGEN_WITH_CUDA"],
                                "nvcc": ["-O3", "-lineinfo", "-DFASTGEN_WITH_CUDA"]},
            extra_link_args=["-fopenmp"], optional=optional)
    else:
        ext = cpp_extension.CppExtension(
            "fastgen._C", sources, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"], optional=optional)
    print(f"fastgen: building fastgen._C ({'CPU + CUDA' if use_cuda else 'CPU'}, optional={optional})")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
