"""Ahead-of-time compilation of every Triton kernel of fastgen for sm_80 / sm_90 / sm_100, no GPU.

usage: python -m bench.aot [--arch 80,90,100] [--quick] [--jobs N] [--only knn,...] [-v] [--json FILE]

Prints per architecture one line

    aot: sm_<arch> compiled <ok>/<total> kernels (<configs> configs, <n> with spills, max smem <bytes>)

and exits non-zero when a configuration fails to compile, needs more shared memory than the
architecture gives one block (:data:`SMEM_LIMIT`), or a ``@triton.jit`` function of fastgen is
never compiled (no launch reaches it and no kernel that calls it compiles).

What is compiled is what real launches give, not a hand-written list. The kernels are found by
walking fastgen's modules for ``triton.JITFunction`` objects (``total`` counts every one of
them, helpers included). Then the public ops run on small CPU tensors with the "triton" backend
forced (:data:`DRIVES`: each dtype the op accepts, each var / sigma / k / D form that selects
different constexprs or tile configurations, both shape classes: sizes that are multiples of 16
and sizes that are not) while ``JITFunction.run`` and ``Autotuner.run`` are replaced by a
recorder: every launch goes through Triton's own argument binder for the GPU target
(``create_function_from_signature`` + ``JITFunction._pack_args``, the code a real launch runs),
which gives the signature (dtypes), the constexprs the launcher sets, and the specialisations
a launch on a GPU gets (16-byte aligned pointers, integers divisible by 16 or equal to 1);
an autotuned kernel is recorded once per autotune config. Nothing runs: after each recorded
launch its float tensor arguments are filled with NaN and its integer ones with 0, which sends
the launchers down every data-dependent path (knn's tiers 2-4 run for every query). The
unique (kernel, signature, constexprs, specialisation, options) tuples are then compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, the compiler and ptxas
that ship with Triton, in ``--jobs`` worker processes.

Per config: shared memory (``metadata.shared``), registers and stack frame from
``cuobjdump -res-usage`` of the cubin (a stack frame in a Triton kernel is register spills:
Triton kernels keep no local arrays). Launch-time integers are those the launchers compute for
the driven CPU shapes (the number of SMs enters a few grid splits on GPU: it changes grid sizes,
not the compiled code, except through divisibility of those integers).

Kernels no CPU launch reaches (a launcher branch taken only for CUDA tensors) are launched by
:data:`MANUAL`, mirroring their launcher; a kernel added to fastgen must be reached by a drive
or a MANUAL entry, else this script fails (``ok < total``).

Scope. The default drives every op over every dtype and all its cases (knn: Dp 16 to 1024,
C 4 to 128, batched, both shape classes): about 670 configs per architecture, some 20 minutes
per architecture on 2 busy cores (Triton compiles a knn tile config in 5-30 s). ``--quick``
(CI) keeps every autotune config of knn's two fp32 code paths (query tile resident, D loop),
every constexpr combination of the other kernels in float32, and the other dtypes' code
paths once: about 220 configs per architecture. Set ``TRITON_CACHE_DIR`` to a fresh folder
to time a cold compile (Triton's cache otherwise answers repeated runs).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import io
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings


def _gpu_mode() -> None:
    """Kernels must be real JITFunctions (TRITON_INTERPRET unset) when fastgen is imported."""
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton >= 3.9 warns when unset; 1 = its default

ARCHS = (80, 90, 100)
# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin, CUDA
# C++ Programming Guide, "Technical Specifications per Compute Capability"): 163 KB on 8.0
# (A100), 227 KB on 9.0 (H100 / H200) and 10.0 (B200 / GB200). Triton checks its kernels against
# this attribute at load time ("out of resource: shared memory").
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
OPS = ("knn", "gaussian_nll", "spread_noise", "spread_log_likelihood")


# ------------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------------
def _jit_of(obj):
    """The JITFunction behind obj (itself, or under Autotuner / Heuristics wrappers), else None
    (an InterpretedFunction under TRITON_INTERPRET=1 counts for discovery, not for compiling)."""
    from triton.runtime.jit import JITFunction

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        InterpretedFunction = JITFunction
    for _ in range(4):
        if isinstance(obj, (JITFunction, InterpretedFunction)):
            return obj
        obj = getattr(obj, "fn", None)
        if obj is None:
            return None
    return None


def discover() -> dict:
    """{qualified name: JITFunction} of every @triton.jit function defined in fastgen."""
    import fastgen

    found = {}
    for m in pkgutil.walk_packages(fastgen.__path__, "fastgen."):
        try:
            mod = importlib.import_module(m.name)
        except Exception as e:  # noqa: BLE001 - a module that cannot import hides its kernels: fail
            raise RuntimeError(f"bench.aot: cannot import {m.name}: {type(e).__name__}: {e}") from e
        for obj in list(vars(mod).values()):
            jf = _jit_of(obj)
            if jf is not None and jf.fn.__module__.startswith("fastgen"):
                found[f"{jf.fn.__module__}.{jf.fn.__name__}"] = jf
    return found


def _qualname(jf) -> str:
    return f"{jf.fn.__module__}.{jf.fn.__name__}"


def callees(jf) -> set:
    """Qualified names of the @triton.jit functions jf calls (directly)."""
    src = textwrap.dedent(jf.src if hasattr(jf, "src") else __import__("inspect").getsource(jf.fn))
    g = jf.fn.__globals__
    out = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Call):
            f = node.func
            target = None
            if isinstance(f, ast.Name):
                target = g.get(f.id)
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in g:
                target = getattr(g[f.value.id], f.attr, None)
            sub = _jit_of(target) if target is not None else None
            if sub is not None and sub is not jf and sub.fn.__module__.startswith("fastgen"):
                out.add(_qualname(sub))
    return out


# ------------------------------------------------------------------------------------------------
# recording real launches
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Spec:
    """One compilation: what a launch on ``arch`` hands to triton.compile."""
    name: str            # qualified kernel name
    arch: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    label: str = ""

    def key(self) -> str:
        return repr((self.name, self.arch, sorted(self.signature.items()), sorted(self.constexprs.items(), key=str),
                     sorted(self.attrs.items(), key=str), sorted(self.options.items(), key=str)))


def _short(v) -> str:
    s = str(v)
    return s.replace("triton.language.", "tl.").replace("fp32", "f32")


def _label(jf, sig, constexprs, opts) -> str:
    names = jf.arg_names
    dts = sorted({t for t in sig.values() if t.startswith("*")})
    cx = ",".join(f"{names[k[0]]}={_short(v)}" for k, v in sorted(constexprs.items()) if len(k) == 1)
    return f"{jf.fn.__name__}[{'/'.join(dts)}] {cx} w{opts.get('num_warps')} s{opts.get('num_stages')}"


class Recorder:
    """Context manager: launches of Triton kernels are recorded (per arch), not run."""

    def __init__(self, archs):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.archs = tuple(archs)
        self.backends = {a: make_backend(GPUTarget("cuda", a, 32)) for a in self.archs}
        self.specs: dict[str, Spec] = {}
        self.launched: set[str] = set()
        self.errors: list[str] = []
        self._binders = {}

    def _record(self, jf, args, kwargs):
        from triton.runtime.jit import create_function_from_signature

        name = _qualname(jf)
        self.launched.add(name)
        for a, be in self.backends.items():
            b = self._binders.get((id(jf), a))
            if b is None:
                b = self._binders[(id(jf), a)] = create_function_from_signature(jf.signature, jf.params, be)
            bound, spec, opts = b(*args, **kwargs)
            options, sig, cx, attrs = jf._pack_args(be, dict(kwargs), bound, spec, opts)
            od = dict(options.__dict__)
            s = Spec(name, a, dict(sig), dict(cx), dict(attrs), od, _label(jf, sig, cx, od))
            self.specs.setdefault(s.key(), s)
        # nothing ran: poison the buffers so that the launcher takes every data-dependent path
        import torch

        for v in list(args) + list(kwargs.values()):
            if isinstance(v, torch.Tensor) and v.numel():
                if v.dtype.is_floating_point:
                    v.detach().fill_(float("nan"))
                else:
                    v.detach().zero_()

    @contextlib.contextmanager
    def active(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        from fastgen import _dispatch

        rec = self
        saved = (JITFunction.run, Autotuner.run, _dispatch._triton_reason)

        def jit_run(self, *args, grid=None, warmup=False, **kwargs):
            rec._record(self, args, kwargs)
            return None

        def tune_run(self, *args, grid=None, warmup=False, **kwargs):
            for cfg in self.configs:  # every autotune config, as autotuning would compile them
                self.fn.run(*args, grid=grid, warmup=warmup, **{**kwargs, **cfg.all_kwargs()})
            return None

        JITFunction.run, Autotuner.run = jit_run, tune_run
        _dispatch._triton_reason = lambda device_type: None  # "triton" counts as available on CPU here
        try:
            with _dispatch.use_backend("triton"):  # every op: its triton backend, explicitly
                yield self
        finally:
            JITFunction.run, Autotuner.run, _dispatch._triton_reason = saved


# ------------------------------------------------------------------------------------------------
# the drives: public calls with the triton backend forced, on CPU tensors
# ------------------------------------------------------------------------------------------------
def _t(*shape, dtype, grad=False, lo=None):
    import torch

    x = torch.randn(tuple(shape), dtype=torch.float64)
    if lo is not None:
        x = x.abs() + lo
    return x.to(dtype).requires_grad_(grad)


def _backward(out):
    import torch

    out = out[0] if isinstance(out, tuple) else out
    if out.requires_grad:
        torch.autograd.backward(out, torch.ones_like(out))


def drive_knn(dtypes, quick=False):
    import torch

    import fastgen

    # (B, N, M, D, k): Dp = 16 / 32 / 64 / 128 (query tile resident) and 512 / 1024 (D loop);
    # C = 4 (k = 1), 8 (k = 2, 5), 32 (k = 20), 128 (k = 100); tiny sets take the fallback tile;
    # B > 1 batched; the last two: sizes that are multiples of 16 (other integer specialisations)
    cases = [(1, 1000, 3000, 64, 1), (1, 1000, 3000, 500, 1), (1, 300, 2000, 128, 20), (1, 200, 1500, 1000, 100),
             (1, 5, 40, 3, 2), (3, 100, 300, 30, 5), (1, 1024, 4096, 64, 1), (1, 512, 2048, 512, 1)]
    for dt in dtypes:
        todo = cases
        if quick:  # CI: every tile config of the two fp32 code paths (resident Q, D loop); the other
            # dtypes' code paths once, on small sets (fallback tile; batched)
            todo = {torch.float32: cases[:2], torch.float16: cases[5:6]}.get(dt, cases[4:5])
        for B, N, M, D, k in todo:
            q = _t(B, N, D, dtype=dt, grad=True)
            key = _t(B, M, D, dtype=dt)
            if B == 1:
                q, key = q.detach()[0].requires_grad_(), key[0]
            _backward(fastgen.knn(q, key, k=k))


def drive_gaussian_nll(dtypes, quick=False):
    import torch

    import fastgen

    # every constexpr of the kernel takes each of its values for each dtype (reduction none /
    # mean / sum, log_var, beta, full, which gradients, per-element / broadcast / float var),
    # and both tile plans (B == 1: flat; B > 1: var broadcast over rows)
    for dt in dtypes:
        cases = [
            ((1000, 37), (1000, 37), "mean", False, 0.0, False, "xv"),
            ((1024, 64), (1024, 64), "sum", True, 0.5, True, "xtv"),
            ((999, 37), (999, 1), "none", False, 0.0, True, "xv"),
            ((64, 3, 17, 9), (64, 1, 17, 9), "mean", False, 0.5, False, "xtv"),
            ((512, 8192), (1, 8192), "mean", False, 0.0, False, "x"),
            ((300, 50), (300, 50), "none", True, 0.5, False, "xtv"),
            ((300, 50), None, "mean", False, 0.0, False, "xt"),
            ((300, 50), (300, 50), "sum", False, 0.0, False, ""),
        ]
        if quick and dt != dtypes[0]:  # the other dtypes: both tile plans, none / mean, grads
            cases = cases[:3]
        for shape, vshape, red, log_var, beta, full, grads in cases:
            x = _t(*shape, dtype=dt, grad="x" in grads)
            t = _t(*shape, dtype=dt, grad="t" in grads)
            v = 0.7 if vshape is None else _t(*vshape, dtype=dt, grad="v" in grads, lo=None if log_var else 0.1)
            ctx = contextlib.nullcontext() if grads else torch.no_grad()
            with ctx:
                out = fastgen.gaussian_nll_loss(x, t, v, full=full, reduction=red, log_var=log_var, beta=beta)
            _backward(out)


def drive_spread_noise(dtypes, quick=False):
    import torch

    import fastgen

    for dt in dtypes:
        for kind in ("gaussian", "laplace"):
            x = _t(257, 33, dtype=dt, grad=True)
            _backward(fastgen.spread_noise(x, 0.3, kind=kind))                      # float sigma
            # sigma: one element, per dimension, per channel, 2 / 3 / 4 alternating broadcast groups
            # (NG), 5 groups (materialised), sizes that are multiples of 16
            forms = [((257, 33), ()), ((257, 33), (33,)), ((8, 3, 5, 7), (3, 1, 1)),
                     ((4, 3, 5, 6), (4, 1, 5, 1)), ((2, 3, 2, 3, 2, 3), (2, 1, 2, 1, 2, 1)),
                     ((2, 3, 2, 3, 2, 3, 2, 3), (2, 1, 2, 1, 2, 1, 2, 1)), ((2, 3) * 5, (2, 1) * 5),
                     ((1024, 64), (64,))]
            if quick and dt != dtypes[0]:
                forms = forms[:2]
            for xs, ss in forms:
                x = _t(*xs, dtype=dt, grad=True)
                s = _t(*ss, dtype=dt, grad=True, lo=0.1)
                _backward(fastgen.spread_noise(x, s, kind=kind))
        with torch.no_grad():
            fastgen.spread_noise(_t(4096, dtype=dt), 1.0)


def drive_spread_log_likelihood(dtypes, quick=False):
    import fastgen

    for dt in dtypes:
        for kind in ("gaussian", "laplace"):
            cases = [(100, 70, 5, False, "ysx"), (128, 256, 16, True, "ysx"), (100, 70, 5, True, "y"),
                     (100, 70, 5, False, "s"), (100, 70, 5, True, "x")]
            if quick and dt != dtypes[0]:
                cases = cases[:2]
            for N, S, D, perdim, need in cases:
                y = _t(N, D, dtype=dt, grad="y" in need)
                x = _t(S, D, dtype=dt, grad="x" in need)
                s = _t(D if perdim else 1, dtype=dt, grad="s" in need, lo=0.5)
                _backward(fastgen.spread_log_likelihood(y, x, s, kind=kind))


DRIVES = {"knn": drive_knn, "gaussian_nll": drive_gaussian_nll, "spread_noise": drive_spread_noise,
          "spread_log_likelihood": drive_spread_log_likelihood}


def _manual_scale_kernel(dtypes, quick=False):
    """gaussian_nll's _scale_kernel runs only for CUDA grad_outputs (_triton_scale); its launch."""
    import torch

    from fastgen.ops import gaussian_nll as m

    for dt in dtypes:
        for n in (1000, 4096):
            g = torch.empty(n, dtype=dt)
            go = torch.ones(1, dtype=dt)
            m._scale_kernel[(math.ceil(n / 4096),)](g, go, n, CDT=m._tl_cdt(g.dtype), BLOCK=4096, num_warps=8)


# kernels reached only from CUDA-only launcher branches: (module, kernel name, launch function)
MANUAL = [("fastgen.ops.gaussian_nll", "_scale_kernel", _manual_scale_kernel)]


def record(archs, ops=OPS, dtypes=None, quick=False) -> Recorder:
    import torch

    from triton.runtime.jit import JITFunction

    _gpu_mode()
    if not all(isinstance(f, JITFunction) for f in discover().values()):
        raise RuntimeError("bench.aot: fastgen's kernels are interpreted (imported under TRITON_INTERPRET=1): "
                           "record launches in a fresh process")
    dtypes = dtypes or (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    rec = Recorder(archs)
    torch.manual_seed(0)
    with rec.active(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op in ops:
            try:
                DRIVES[op](dtypes, quick)
            except Exception as e:  # a launcher that fails on the way: the exit status says it
                rec.errors.append(f"drive {op} failed: {type(e).__name__}: {e}".splitlines()[0][:300])
        for mod, name, fn in MANUAL:
            if any(op in mod for op in ops) and hasattr(importlib.import_module(mod), name):
                fn(dtypes, quick)
    return rec


# ------------------------------------------------------------------------------------------------
# compilation (worker processes)
# ------------------------------------------------------------------------------------------------
_FNS = None


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _res_usage(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (-1, -1)


def compile_spec(spec: Spec) -> dict:
    """Compile one Spec; returns {ok, smem, regs, stack, seconds, error}."""
    global _FNS
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if _FNS is None:
        _FNS = discover()
    jf = _FNS[spec.name]
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            k = triton.compile(ASTSource(jf, spec.signature, spec.constexprs, spec.attrs),
                               target=GPUTarget("cuda", spec.arch, 32), options=dict(spec.options))
    except Exception as e:  # noqa: BLE001 - reported, and the exit status says it
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        return dict(ok=False, smem=0, regs=-1, stack=-1, seconds=time.perf_counter() - t0,
                    error=" | ".join(s for s in msg if s.strip())[:400])
    regs, stack = _res_usage(k.asm["cubin"])
    ptx, ttgir = k.asm.get("ptx", ""), k.asm.get("ttgir", "")
    return dict(ok=True, smem=int(k.metadata.shared), regs=regs, stack=stack,
                seconds=time.perf_counter() - t0, error=None,
                # matrix instructions (warp-group MMA on sm_90a, tcgen05 on sm_100a, mma.sync) and
                # whether loads were software-pipelined (async copies): what bench/knn_triton_aot showed
                wgmma=ptx.count("wgmma.mma_async"), tcgen05=ptx.count("tcgen05.mma"), mma=ptx.count("mma.sync"),
                pipelined="async_copy_global_to_local" in ttgir or "async_tma_copy" in ttgir)


def _init_worker():
    _gpu_mode()
    global _FNS
    _FNS = discover()


def compile_all(specs, jobs: int):
    if jobs <= 1:
        return [compile_spec(s) for s in specs]
    import concurrent.futures as cf
    import multiprocessing as mp

    # spawn, never fork: torch's OpenMP threads may have run in this process
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker) as ex:
        return list(ex.map(compile_spec, specs, chunksize=1))


# ------------------------------------------------------------------------------------------------
def summarise(arch, fns, specs, results):
    """(line, ok, failures) for one architecture."""
    limit = SMEM_LIMIT[arch]
    by_kernel: dict[str, list] = {}
    for s, r in zip(specs, results):
        by_kernel.setdefault(s.name, []).append((s, r))
    good = {n for n, rows in by_kernel.items() if all(r["ok"] and r["smem"] <= limit for _, r in rows)}
    calls = {n: callees(jf) for n, jf in fns.items()}
    compiled = set(good)
    frontier = list(good)
    while frontier:  # a helper counts as compiled when a kernel that calls it compiles
        for c in calls.get(frontier.pop(), ()):
            if c not in compiled:
                compiled.add(c)
                frontier.append(c)
    ok = len(compiled & set(fns))
    problems = []
    for s, r in zip(specs, results):
        if not r["ok"]:
            problems.append(f"sm_{arch} FAILED {s.label}: {r['error']}")
        elif r["smem"] > limit:
            problems.append(f"sm_{arch} SMEM {r['smem']} > {limit} bytes: {s.label}")
    for n in sorted(set(fns) - compiled):
        if n not in by_kernel:
            problems.append(f"sm_{arch} NOT COMPILED {n}: no launch reaches it (add a drive or a MANUAL entry "
                            f"in bench/aot.py) and no compiled kernel calls it")
    spills = sum(1 for r in results if r["ok"] and r["stack"] > 0)
    smem = max((r["smem"] for r in results if r["ok"]), default=0)
    line = (f"aot: sm_{arch} compiled {ok}/{len(fns)} kernels ({len(specs)} configs, {spills} with spills, "
            f"max smem {smem})")
    return line, ok == len(fns) and not problems, problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated: 80,90,100")
    p.add_argument("--only", default=",".join(OPS), help="ops whose launches are driven")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--quick", action="store_true",
                   help="CI scope: every tile config for fp32 / bf16 buffers, the other dtypes' paths once")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per config")
    p.add_argument("--json", help="write every config's result here")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]
    for a in archs:
        if a not in SMEM_LIMIT:
            p.error(f"--arch {a}: known architectures are {sorted(SMEM_LIMIT)}")
    ops = [o for o in args.only.split(",") if o]
    for o in ops:
        if o not in DRIVES:
            p.error(f"--only {o}: ops are {list(DRIVES)}")

    if "fastgen" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("bench.aot: fastgen was imported under TRITON_INTERPRET=1; run it in a fresh process")
    _gpu_mode()
    import triton

    t0 = time.perf_counter()
    fns = discover()
    rec = record(archs, ops, quick=args.quick)
    t_rec = time.perf_counter() - t0
    if set(ops) != set(OPS):  # a partial run only answers for the kernels of the driven ops
        mods = {s.name.rsplit(".", 1)[0] for s in rec.specs.values()}
        fns = {n: f for n, f in fns.items() if n.rsplit(".", 1)[0] in mods}
    print(f"aot: triton {triton.__version__}, {len(fns)} @triton.jit functions, "
          f"{len(rec.specs)} launch specialisations recorded in {t_rec:.1f} s", flush=True)
    status, out = 0, []
    for err in rec.errors:
        print("  " + err)
        status = 1
    for arch in archs:
        specs = [s for s in rec.specs.values() if s.arch == arch]
        t1 = time.perf_counter()
        results = compile_all(specs, args.jobs)
        line, good, problems = summarise(arch, fns, specs, results)
        if args.verbose:
            for s, r in sorted(zip(specs, results), key=lambda sr: sr[0].label):
                st = (f"smem={r['smem']:7d} regs={r['regs']:>3} stack={r['stack']:>5} wgmma={r['wgmma']} "
                      f"tcgen05={r['tcgen05']} mma={r['mma']} pipelined={r['pipelined']}" if r["ok"]
                      else f"FAILED {r['error']}")
                print(f"  sm_{arch} {s.label:90s} {st} {r['seconds']:.1f}s")
        for prob in problems:
            print("  " + prob)
        print(f"  sm_{arch}: {len(specs)} configs compiled in {time.perf_counter() - t1:.0f} s "
              f"({args.jobs} processes)")
        print(line, flush=True)
        status |= 0 if good else 1
        out += [dict(arch=arch, kernel=s.name, label=s.label, **r) for s, r in zip(specs, results)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, smem_limit=SMEM_LIMIT, configs=out), f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
