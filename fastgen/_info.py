"""`fastgen info`: what this machine can run, and why a backend is missing.

Also lists the GPU kernel backends that failed to compile or launch in this process and that
"auto" therefore stopped using (``fastgen._dispatch.failures()``, the safe fallback): call
:func:`print_info` in the process that saw the failure (the command line starts a fresh one).
"""
from __future__ import annotations

import platform


def info_lines() -> list[str]:
    import torch

    from . import __version__, _backend, _dispatch

    lines = [f"fastgen {__version__}  python {platform.python_version()}  torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:
        lines.append(f"triton: not available ({type(e).__name__})")
    try:
        import faiss

        ngpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        lines.append(f"faiss {faiss.__version__} ({ngpu} GPU(s) visible to faiss)")
    except Exception as e:
        lines.append(f"faiss: not available ({type(e).__name__}: {e})")
    ext = _backend.load_ext()
    if ext is None:
        lines.append(f"fastgen._C: not loaded: {_backend.ext_error()}")
    else:
        lines.append("fastgen._C: loaded (CPU kernels)")
        import os

        forced = os.environ.get("FASTGEN_CPU_ISA")
        how = f"forced by FASTGEN_CPU_ISA={forced}" if forced else "chosen from the CPU's features"
        try:
            path = _backend.cpu_isa()
        except RuntimeError as e:
            path = f"none: {e}"
        lines.append(f"CPU kernel path: {path} ({how}; this CPU runs: "
                     f"{', '.join(_backend.cpu_isas_available()) or 'none'})")
    cext = _backend.load_cuda_ext()
    lines.append("fastgen._C_cuda: loaded (CUDA kernels)" if cext is not None
                 else f"fastgen._C_cuda: not loaded: {_backend.cuda_ext_error()}")
    cuda = torch.cuda.is_available()
    lines.append(f"CUDA: {torch.cuda.get_device_name(0) if cuda else 'no CUDA device'}  "
                 f"CPU threads: {torch.get_num_threads()}")
    devices = ("cpu", "cuda")
    lines.append("")
    lines.append(f"{'op':<24}{'device':<8}{'backend':<9}status")
    for op, dev, name, why in _dispatch.report(devices):
        if dev == "cuda" and not cuda and why is None:
            why = "no CUDA device on this machine"
        status = "available" if why is None else f"missing: {why}"
        lines.append(f"{op:<24}{dev:<8}{name:<9}{status}")
    fails = _dispatch.failures()
    lines.append("")
    if fails:
        lines.append("GPU kernels that failed in this process ('auto' uses the next backend for them):")
        for (op, name, dev), why in sorted(fails.items()):
            lines.append(f"  {op} {name} on {dev}: {why}")
    else:
        lines.append("GPU kernels that failed in this process: none")
    lines.append("auto picks, on this machine's CPU: " + ", ".join(
        f"{op}={_dispatch.select(op, 'auto', 'cpu')[0]}" for op in _dispatch.ORDER))
    return lines


def print_info() -> None:
    print("\n".join(info_lines()))
