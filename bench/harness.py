"""Microbenchmark harness (do_bench style): warm-up, repeated timing, median and 20 / 80 %
quantiles, peak memory, CSV rows that name the device and the torch / Triton versions.

Every bench script builds a list of cases and calls :func:`run_case` per (case, implementation);
rows go to ``<outdir>/<device>.csv`` (appended, one header). On CUDA, timing uses CUDA events
with the L2 cache flushed between repetitions; on CPU, time.perf_counter.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import os
import platform
import re
import statistics
import time
from typing import Callable

import torch

FIELDS = ["date", "device", "torch", "triton", "op", "case", "impl", "dtype", "mode",
          "median_ms", "p20_ms", "p80_ms", "reps", "peak_mem_mib", "wrong", "max_err", "note"]


def device_name(device: str | torch.device = "cpu") -> str:
    """A file-name-safe name of the machine the benchmark runs on."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        cpu = line.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        name = f"cpu-{torch.get_num_threads()}t-{cpu}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:80]


def versions() -> dict[str, str]:
    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "none"
    return {"torch": torch.__version__, "triton": tv}


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(times_ms: list[float]) -> tuple[float, float, float]:
    t = sorted(times_ms)
    if len(t) == 1:
        return t[0], t[0], t[0]
    q = statistics.quantiles(t, n=10, method="inclusive")  # deciles
    return statistics.median(t), q[1], q[7]


def bench(fn: Callable[[], object], *, device="cpu", warmup_ms: float = 25.0, rep_ms: float = 100.0,
          min_reps: int = 5, max_reps: int = 1000, grad_to_none=None) -> dict:
    """Time ``fn()``. Returns dict(median_ms, p20_ms, p80_ms, reps, peak_mem_mib).

    Like triton.testing.do_bench: estimate the run time from a few calls, then warm up for
    ``warmup_ms`` and repeat for ``rep_ms`` (at least ``min_reps`` times). Peak memory is the
    allocator peak above the memory in use before the call (CUDA), or the RSS high-water mark
    growth (CPU, coarse)."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        cache = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        peak = float("nan")
    # estimate
    t0 = time.perf_counter()
    n_est = 0
    while n_est < 3 or (time.perf_counter() - t0) * 1e3 < 5:
        fn()
        n_est += 1
        if n_est >= 100:
            break
    _sync(device)
    est = (time.perf_counter() - t0) * 1e3 / n_est
    n_warm = max(1, int(warmup_ms / max(est, 1e-3)))
    n_rep = int(min(max_reps, max(min_reps, rep_ms / max(est, 1e-3))))
    for _ in range(n_warm):
        fn()
    _sync(device)
    times = []
    for _ in range(n_rep):
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        if device.type == "cuda":
            cache.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize(device)
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    med, p20, p80 = quantiles(times)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": n_rep, "peak_mem_mib": peak}


def bench_backward(make_out: Callable[[], torch.Tensor], params, *, device="cpu", rep_ms: float = 100.0,
                   min_reps: int = 5, max_reps: int = 200) -> dict:
    """Time ``out.backward(ones)`` alone: ``make_out()`` (the forward) runs untimed before every
    repetition, with the gradients of ``params`` reset. Same keys as :func:`bench`; peak memory
    is the backward's, over what the forward left allocated (CUDA only, NaN on CPU)."""
    device = torch.device(device)
    grad = None

    def once():
        nonlocal grad
        for p in params:
            p.grad = None
        out = make_out()
        if grad is None:
            grad = torch.ones_like(out)
        _sync(device)
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            out.backward(grad)
            e.record()
            torch.cuda.synchronize(device)
            return s.elapsed_time(e), (torch.cuda.max_memory_allocated(device) - base) / 2**20
        t0 = time.perf_counter()
        out.backward(grad)
        return (time.perf_counter() - t0) * 1e3, float("nan")

    est, peak = once()
    once()
    n = int(min(max_reps, max(min_reps, rep_ms / max(est, 1e-3))))
    times = [once()[0] for _ in range(n)]
    med, p20, p80 = quantiles(times)
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80, "reps": n, "peak_mem_mib": peak}


class Recorder:
    """Collects rows and appends them to ``<outdir>/<device>.csv``; prints each row."""

    def __init__(self, op: str, outdir: str, device="cpu"):
        self.op = op
        self.outdir = outdir
        self.device = torch.device(device)
        self.dev_name = device_name(self.device)
        self.rows: list[dict] = []

    @property
    def path(self) -> str:
        return os.path.join(self.outdir, f"{self.dev_name}.csv")

    def add(self, case: str, impl: str, dtype, mode: str, timing: dict | None, **extra) -> dict:
        row = {k: "" for k in FIELDS}
        row.update(date=_dt.datetime.now().isoformat(timespec="seconds"), device=self.dev_name,
                   op=self.op, case=case, impl=impl, dtype=str(dtype).replace("torch.", ""), mode=mode,
                   **versions())
        if timing:
            row.update({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in timing.items() if k in FIELDS})
        for k, v in extra.items():
            if k not in FIELDS:
                raise KeyError(f"unknown CSV field {k!r}")
            row[k] = f"{v:.4g}" if isinstance(v, float) else v
        self.rows.append(row)
        t = f"{row['median_ms']:>10} ms [{row['p20_ms']}, {row['p80_ms']}]" if timing else "-"
        print(f"{self.op:>22} {case:>24} {impl:>22} {row['dtype']:>8} {mode:>8} {t} "
              f"mem={row['peak_mem_mib']} wrong={row['wrong']} err={row['max_err']} {row['note']}", flush=True)
        return row

    def save(self) -> str:
        os.makedirs(self.outdir, exist_ok=True)
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerows(self.rows)
        print(f"wrote {len(self.rows)} rows to {self.path}")
        return self.path


def parser(description: str, *, compile_peer: bool = False) -> argparse.ArgumentParser:
    """--quick --device --outdir --rep-ms; with ``compile_peer`` also --no-compile (skip the
    torch.compile peer; see :func:`use_compile`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes (CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--outdir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--rep-ms", type=float, default=None, help="timing budget per case (ms)")
    if compile_peer:
        p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--isa", default="auto",
                   help="CPU paths of fastgen's C++ kernels to time, each beside the same peers: auto (the "
                        "path in use), a comma list of baseline,avx2,avx512, or all (every path this CPU "
                        "runs); rows name the path: fastgen-cpu[avx2]")
    return p


def cpu_isas(args) -> list[str]:
    """The CPU paths --isa asks for (validated against the paths this CPU runs)."""
    from fastgen import _backend

    avail = _backend.cpu_isas_available()
    if args.isa == "auto":
        return [_backend.cpu_isa()]
    want = avail if args.isa == "all" else [a.strip() for a in args.isa.split(",") if a.strip()]
    bad = [a for a in want if a not in avail]
    if bad:
        raise SystemExit(f"--isa: {', '.join(bad)} not runnable here (this CPU / build runs: {', '.join(avail)})")
    return want


def with_isa_paths(impls: dict, ours: str, args, device) -> tuple[dict, list[str]]:
    """Expand the fastgen impl ``ours`` ("fastgen-cpu" on CPU) into one impl per CPU path of --isa,
    named "fastgen-cpu[<path>]", each switching fastgen._C to its path before every call (a
    test / benchmark hook: fastgen._backend.set_cpu_isa); --isa auto keeps "fastgen-cpu" as it
    is. Other impls (the peers) are kept.
    Returns (impls, names of ours)."""
    if torch.device(device).type != "cpu" or not ours.endswith("-cpu") or args.isa == "auto":
        return impls, [ours]  # (auto: the path in use, no switch inside the timed calls)
    from fastgen import _backend

    out, names = {}, []
    for name, fn in impls.items():
        if name != ours:
            out[name] = fn
            continue
        for isa in cpu_isas(args):
            def run(*a, _fn=fn, _isa=isa, **k):
                _backend.set_cpu_isa(_isa)
                return _fn(*a, **k)
            out[f"{ours}[{isa}]"] = run
            names.append(f"{ours}[{isa}]")
    return out, names


def use_compile(args) -> bool:
    """Whether to time the torch.compile peer: not with --no-compile, and not in a CPU --quick run
    (compiling costs tens of seconds on CPU)."""
    return not args.no_compile and not (args.quick and torch.device(args.device).type != "cuda")


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"
