"""Backend selection: the one place where fastgen decides which implementation runs an op.

Each op module registers its implementations with :func:`register`; public functions call
:func:`select` with the user's ``backend`` argument ("auto" or a name) and the device of the
inputs. "auto" walks the op's ordered list for that device (``ORDER``) and takes the first
available backend. Overrides, strongest first:

* an explicit ``backend=`` argument of a public function (knn, imle_loss);
* the context manager :func:`use_backend` (tests and benchmarks);
* the environment variable ``FASTGEN_BACKEND``: a name for every op (``torch``) or a
  comma-separated list ``op=name`` (``knn=faiss,gaussian_nll=torch``).

A named backend that is unavailable raises RuntimeError with the reason; an unknown name
raises ValueError.

Safe fallback (:func:`run`): when a GPU kernel backend ("triton", "cuda") fails to compile or
launch on this device under "auto" (old architecture, driver, shared memory, ...), the next
backend of ``ORDER`` runs instead, with one RuntimeWarning naming the failure; the failure is
remembered for the process (:func:`failures`, shown by ``fastgen info``). An explicit backend
(argument, ``use_backend`` or ``FASTGEN_BACKEND``) still raises. Bad input (ValueError /
TypeError) and out-of-memory errors are never swallowed.

This module knows backends only by their registration (:func:`register`, called by the op
modules when ``import fastgen`` imports them); it imports none of them.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from typing import Callable

from . import _backend

# Ordered preferences of "auto", by op and device type. Measured crossovers live in the ops'
# own `auto_filter` hooks (see register); this table is the coarse order.
ORDER: dict[str, dict[str, tuple[str, ...]]] = {
    "knn": {"cuda": ("triton", "cuda", "faiss", "torch"), "cpu": ("cpu", "faiss", "torch")},
    "gaussian_nll": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "spread_noise": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
    "spread_log_likelihood": {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")},
}
BACKENDS = ("torch", "cpu", "cuda", "triton", "faiss")

# backends whose kernels are compiled for the user's device when first run: they may fail there
FALLIBLE = ("triton", "cuda")

_IMPLS: dict[tuple[str, str], Callable] = {}
_FAILED: dict[tuple[str, str, str], str] = {}   # (op, backend, device type) -> the failure
_AUTO_FILTERS: dict[tuple[str, str], Callable] = {}
_local = threading.local()


def register(op: str, backend: str, auto_filter: Callable | None = None):
    """Decorator: register ``fn`` as the ``backend`` implementation of ``op``.

    ``auto_filter(**shape_info) -> bool`` (optional) lets "auto" skip this backend for shapes
    where it is known to lose (measured crossovers)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")

    def deco(fn):
        _IMPLS[(op, backend)] = fn
        if auto_filter is not None:
            _AUTO_FILTERS[(op, backend)] = auto_filter
        return fn

    return deco


def _triton_reason(device_type: str) -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"triton not importable ({type(e).__name__}: {e})"
    if device_type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 on CPU)"


def _faiss_reason(device_type: str) -> str | None:
    try:
        import faiss
    except Exception as e:
        return f"faiss not importable ({type(e).__name__}: {e}); pip install faiss-cpu (or faiss-gpu)"
    if device_type == "cuda":
        ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        if ngpu == 0:
            return "faiss has no GPU support here (faiss-cpu build or no GPU visible)"
    return None


def unavailable_reason(op: str, backend: str, device_type: str) -> str | None:
    """None when ``backend`` can run ``op`` on ``device_type``, else a sentence saying why not."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if (op, backend) not in _IMPLS:
        return f"fastgen has no {backend!r} implementation of {op}"
    failed = _FAILED.get((op, backend, device_type))
    if failed is not None:
        return f"failed earlier in this process: {failed}"
    if backend == "torch":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return "the 'cpu' backend runs on CPU tensors only"
        if not _backend.has_kernel(op, "CPU"):
            return _backend.ext_error() or f"fastgen._C has no CPU kernel for {op} (rebuild the extension)"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return "the 'cuda' backend runs on CUDA tensors only"
        if not _backend.has_kernel(op, "CUDA"):
            return (_backend.ext_error() or _backend.cuda_ext_error()
                    or f"fastgen._C_cuda has no CUDA kernel for {op}")
        return None
    if backend == "triton":
        return _triton_reason(device_type)
    if backend == "faiss":
        return _faiss_reason(device_type)
    return None


def _override(op: str) -> str | None:
    stack = getattr(_local, "stack", None)
    if stack:
        for o, name in reversed(stack):
            if o is None or o == op:
                return name
    env = os.environ.get("FASTGEN_BACKEND", "").strip()
    if not env:
        return None
    if "=" not in env:
        return env
    for part in env.split(","):
        if "=" in part:
            o, name = (s.strip() for s in part.split("=", 1))
            if o == op:
                return name
    return None


@contextlib.contextmanager
def use_backend(name: str, op: str | None = None):
    """Force ``name`` for ``op`` (or every op) inside the block: ``with use_backend("torch"): ...``."""
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append((op, name))
    try:
        yield
    finally:
        stack.pop()


def select(op: str, backend: str = "auto", device_type: str = "cpu", **shape_info) -> tuple[str, Callable]:
    """Return (backend name, implementation) for ``op`` on ``device_type``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        backend = _override(op) or "auto"
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
        why = unavailable_reason(op, backend, device_type)
        if why is not None:
            raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {why}")
        return backend, _IMPLS[(op, backend)]
    order = ORDER.get(op, {}).get(device_type, ("torch",))
    for name in order:
        if unavailable_reason(op, name, device_type) is not None:
            continue
        filt = _AUTO_FILTERS.get((op, name))
        if filt is not None and shape_info and not filt(**shape_info):
            continue
        return name, _IMPLS[(op, name)]
    return "torch", _IMPLS[(op, "torch")]


def _never_fall_back(e: BaseException) -> bool:
    import torch

    return isinstance(e, (ValueError, TypeError, torch.OutOfMemoryError))


def mark_failed(op: str, backend: str, device_type: str, error: BaseException) -> None:
    """Remember that ``backend`` failed to run ``op`` on ``device_type`` (one warning)."""
    why = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
    _FAILED[(op, backend, device_type)] = why
    warnings.warn(f"fastgen: {op}: the {backend!r} backend failed on this {device_type} device ({why}); "
                  f"'auto' uses the next backend for the rest of this process (fastgen info shows it)",
                  RuntimeWarning, stacklevel=3)


def failures() -> dict[tuple[str, str, str], str]:
    """{(op, backend, device type): failure} of the backends that "auto" stopped using."""
    return dict(_FAILED)


def run(op: str, args: tuple, *, backend: str = "auto", device_type: str = "cpu", kwargs: dict | None = None,
        choice: tuple | None = None, **shape_info):
    """Select the backend of ``op`` (as :func:`select`) and call it with ``args``; under "auto", a
    "triton" / "cuda" backend that raises (compile or launch failure) is marked failed and the next
    backend runs (see the module doc). ``choice``: the ``(name, impl)`` the caller already got from
    :func:`select` with the same arguments (not selected twice). Returns the implementation's
    result."""
    explicit = backend != "auto" or _override(op) is not None
    name, impl = choice if choice is not None else select(op, backend, device_type, **shape_info)
    while True:
        try:
            return impl(*args, **(kwargs or {}))
        except Exception as e:
            if explicit or name not in FALLIBLE or _never_fall_back(e):
                raise
            mark_failed(op, name, device_type, e)
            name, impl = select(op, "auto", device_type, **shape_info)


def report(device_types=("cpu", "cuda")) -> list[tuple[str, str, str, str | None]]:
    """Rows (op, device, backend, reason-or-None) for ``fastgen info`` (the ops register their
    backends when ``import fastgen`` imports them)."""
    rows = []
    for op, by_dev in ORDER.items():
        for dev in device_types:
            for name in by_dev.get(dev, ()):
                rows.append((op, dev, name, unavailable_reason(op, name, dev)))
    return rows

