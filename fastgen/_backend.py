"""Lazy loading of the compiled extensions fastgen._C (CPU kernels, every op's schema) and
fastgen._C_cuda (CUDA kernels, csrc/cuda; built only with a CUDA toolkit, see setup.py).

Both are optional: if one is missing or fails to load, fastgen still works on the pure torch /
Triton paths, and :func:`ext_error` / :func:`cuda_ext_error` say why (cached, shown by
``fastgen info``). :func:`has_kernel` loads fastgen._C_cuda on the first question about a CUDA
kernel, never at ``import fastgen``.
"""
from __future__ import annotations

import functools
import importlib
import os

_error: str | None = None
_cuda_error: str | None = None
# fake (meta) kernels of the compiled ops, by op name: registered once fastgen._C has declared them
_FAKES: dict = {}
_fakes_done = False


def fake(op: str):
    """Decorator: the fake kernel of the compiled op ``fastgen::<op>`` (an underscore-named internal
    kernel declared in csrc/fastgen.cpp). Registered with ``torch.library.register_fake`` when
    fastgen._C loads (at once if it is loaded already), so that torch.compile and
    ``torch.library.opcheck`` can trace the kernel without running it."""
    def deco(fn):
        _FAKES[op] = fn
        if _fakes_done:
            _register_fakes({op: fn})
        return fn
    return deco


def _register_fakes(fakes):
    import torch

    for op, fn in fakes.items():
        torch.library.register_fake(f"fastgen::{op}", fn)


@functools.lru_cache(maxsize=None)
def load_ext():
    """Import fastgen._C once; return the module, or None (reason in :func:`ext_error`)."""
    global _error, _fakes_done
    if os.environ.get("FASTGEN_DISABLE_EXT", "0") == "1":
        _error = "disabled by FASTGEN_DISABLE_EXT=1"
        return None
    try:
        import torch  # noqa: F401  (loads libc10 / libtorch that fastgen._C links against)

        mod = importlib.import_module("fastgen._C")
    except Exception as e:  # ImportError, OSError (undefined symbol, ABI mismatch), ...
        _error = f"fastgen._C not importable: {type(e).__name__}: {e}".strip()
        if isinstance(e, ModuleNotFoundError):
            _error += (" (the C++ extension was not built: reinstall with "
                       "`pip install --no-build-isolation -e .` and a working C++ compiler)")
        return None
    _fakes_done = True
    _register_fakes(_FAKES)
    return mod


def ext_error() -> str | None:
    load_ext()
    return _error


@functools.lru_cache(maxsize=None)
def load_cuda_ext():
    """Import fastgen._C_cuda once (after fastgen._C, which declares the schemas its kernels
    implement); return the module, or None (reason in :func:`cuda_ext_error`)."""
    global _cuda_error
    if load_ext() is None:
        _cuda_error = f"needs fastgen._C, which is not loaded ({_error})"
        return None
    if os.environ.get("FASTGEN_DISABLE_CUDA_EXT", "0") == "1":
        _cuda_error = "disabled by FASTGEN_DISABLE_CUDA_EXT=1"
        return None
    try:
        import importlib.util

        import torch

        if importlib.util.find_spec("fastgen._C_cuda") is None:
            _cuda_error = ("fastgen._C_cuda was not built (build it on a machine with nvcc and a CUDA "
                           "torch: FASTGEN_CUDA=1 pip install --no-build-isolation -e .)")
            return None
        if torch.version.cuda is None:
            _cuda_error = "fastgen._C_cuda is built but this torch is a CPU-only build"
            return None
        return importlib.import_module("fastgen._C_cuda")
    except Exception as e:  # ImportError, OSError (undefined symbol, CUDA runtime mismatch), ...
        _cuda_error = f"fastgen._C_cuda not importable: {type(e).__name__}: {e}".strip()
        return None


def cuda_ext_error() -> str | None:
    """Why fastgen._C_cuda is not loaded (None when it is)."""
    load_cuda_ext()
    return _cuda_error


def kernel_name(op: str) -> str:
    """The compiled kernel op of a dispatch op: "knn" -> "_knn_kernel" (internal ops declared in
    csrc/fastgen.cpp are underscore-named; names that start with "_" are taken as they are)."""
    return op if op.startswith("_") else f"_{op}_kernel"


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when the compiled kernel of ``op`` (:func:`kernel_name`) has a kernel for dispatch_key
    ("CPU" or "CUDA"); a question about "CUDA" loads fastgen._C_cuda first. Cached: the
    extensions load once per process and register their kernels when they load (the dispatcher's
    own lookup costs tens of microseconds, on every call of every op otherwise)."""
    import torch

    if load_ext() is None:
        return False
    if dispatch_key == "CUDA" and load_cuda_ext() is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgen::{kernel_name(op)}", dispatch_key)
    except RuntimeError:  # op not declared
        return False


def ext_op(op: str):
    """The torch.ops.fastgen.<op> overload packet (the extension must be loaded)."""
    import torch

    load_ext()
    return getattr(torch.ops.fastgen, op)


# ---- CPU paths of fastgen._C (csrc/cpu/isa.cpp) ------------------------------------------------
CPU_ISAS = ("baseline", "avx2", "avx512", "native")


def cpu_isa() -> str:
    """The path the CPU kernels of fastgen._C run: "baseline" (x86-64-v2), "avx2" (x86-64-v3),
    "avx512" (x86-64-v4), or "native" (a FASTGEN_NATIVE=1 build). Chosen once when fastgen._C
    loads, from the CPU's features, unless ``FASTGEN_CPU_ISA=baseline|avx2|avx512`` forces one.

    Raises RuntimeError when fastgen._C is not loaded, or when FASTGEN_CPU_ISA names a path this
    CPU cannot run (the message names the variable and the missing CPU features)."""
    import torch

    if load_ext() is None:
        raise RuntimeError(f"fastgen._C is not loaded: {ext_error()}")
    return CPU_ISAS[int(torch.ops.fastgen._cpu_isa_kernel())]


def cpu_isas_available() -> list[str]:
    """The paths built into fastgen._C that this CPU runs, baseline first ([] when fastgen._C is
    not loaded)."""
    import torch

    if load_ext() is None:
        return []
    mask = int(torch.ops.fastgen._cpu_isa_available_kernel())
    return [name for i, name in enumerate(CPU_ISAS) if mask >> i & 1]


def set_cpu_isa(name: str | None) -> str:
    """Tests and benchmarks only: run the CPU kernels on path ``name`` from now on (None: back to
    the path chosen at load time). Not safe while kernels run in other threads. Raises
    RuntimeError when the path is not built or this CPU lacks it. Returns the path now in use."""
    import torch

    if load_ext() is None:
        raise RuntimeError(f"fastgen._C is not loaded: {ext_error()}")
    isa = -1 if name is None else CPU_ISAS.index(name)
    return CPU_ISAS[int(torch.ops.fastgen._cpu_isa_set_kernel(isa))]
