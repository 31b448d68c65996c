"""fastgen._C is built on the LibTorch stable ABI and the CPython limited API: one binary for every
torch >= 2.10 and every CPython >= 3.10 (setup.py; tools/check_wheel.sh checks the wheel itself on
two torch releases and two emulated CPUs).

The binary is checked, not the source: `nm -D --undefined-only -C` of the extension names no
libtorch C++ symbol (at::, c10::, torch::, caffe2::): only the stable C shim (aoti_torch_* /
torch_*), libc / libstdc++ / libgomp and the limited C API of Python."""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from fastgen import _backend

_CXX_TORCH = re.compile(r"\b(at|c10|torch|caffe2)::")


def _ext_path(name):
    spec = importlib.util.find_spec(name)
    return None if spec is None else spec.origin


def _undefined(path, demangle=True):
    cmd = ["nm", "-D", "--undefined-only"] + (["-C"] if demangle else []) + [path]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return [line.split()[-1] if not demangle else line.strip()[2:].strip() for line in out.splitlines() if line.strip()]


needs_nm = pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not on PATH")
needs_ext = pytest.mark.skipif(_backend.load_ext() is None, reason="fastgen._C not built")


@needs_nm
@needs_ext
def test_cpu_extension_has_no_libtorch_cxx_symbols():
    path = _backend.load_ext().__file__
    undef = _undefined(path)
    bad = [s for s in undef if _CXX_TORCH.search(s)]
    assert not bad, f"{os.path.basename(path)} needs {len(bad)} libtorch C++ symbols, e.g. {bad[:8]}"
    # it does use the stable C shim (the registrations, the dispatcher calls of the boundary)
    raw = _undefined(path, demangle=False)
    shim = [s for s in raw if s.startswith(("aoti_torch_", "torch_"))]
    assert {"aoti_torch_library_init_def", "torch_library_impl", "torch_call_dispatcher"} <= set(shim), shim


@needs_ext
def test_cpu_extension_is_a_limited_api_module():
    path = _backend.load_ext().__file__
    assert ".abi3." in os.path.basename(path), f"{path}: not built with py_limited_api (abi3)"
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", path], check=True, capture_output=True, text=True).stdout
        assert "libtorch_python" not in needed, "fastgen._C links libtorch_python (not limited-API)"


@needs_nm
def test_cuda_extension_has_no_libtorch_cxx_symbols():
    path = _ext_path("fastgen._C_cuda")
    if path is None:
        pytest.skip("fastgen._C_cuda not built (needs a CUDA toolkit and a CUDA build of torch)")
    bad = [s for s in _undefined(path) if _CXX_TORCH.search(s)]
    assert not bad, f"{os.path.basename(path)} needs {len(bad)} libtorch C++ symbols, e.g. {bad[:8]}"
