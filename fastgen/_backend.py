"""Lazy loading of the compiled extension fastgen._C.

The extension is optional: if it is missing or fails to load, fastgen still works on the
pure torch / Triton paths, and :func:`ext_error` says why the compiled backends are absent.
"""
from __future__ import annotations

import functools
import importlib
import os

_error: str | None = None


@functools.lru_cache(maxsize=None)
def load_ext():
    """Import fastgen._C once; return the module, or None (reason in :func:`ext_error`)."""
    global _error
    if os.environ.get("FASTGEN_DISABLE_EXT", "0") == "1":
        _error = "disabled by FASTGEN_DISABLE_EXT=1"
        return None
    try:
        import torch  # noqa: F401  (loads libc10 / libtorch that fastgen._C links against)

        return importlib.import_module("fastgen._C")
    except Exception as e:  # ImportError, OSError (undefined symbol, ABI mismatch), ...
        _error = f"fastgen._C not importable: {type(e).__name__}: {e}".strip()
        if isinstance(e, ModuleNotFoundError):
            _error += (" (the C++ extension was not built: reinstall with "
                       "`pip install --no-build-isolation -e .` and a working C++ compiler)")
        return None


def ext_error() -> str | None:
    load_ext()
    return _error


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when torch.ops.fastgen.<op> has a kernel for dispatch_key ("CPU" or "CUDA")."""
    import torch

    if load_ext() is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgen::{op}", dispatch_key)
    except RuntimeError:  # op not declared
        return False


def ext_op(op: str):
    """The torch.ops.fastgen.<op> overload packet (the extension must be loaded)."""
    import torch

    load_ext()
    return getattr(torch.ops.fastgen, op)
