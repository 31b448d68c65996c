"""``fastgen check``: every backend of every public op, proved right on this device and timed.

    fastgen check [--device cpu|cuda] [--ops knn,gaussian_nll_loss,...] [--quick] [--json FILE]

For each public op (:data:`OPS`) and each backend fastgen has for it, on ``--device``:

* **available?** ``fastgen._dispatch.unavailable_reason`` (the reason is printed when not);
* **right?** the public function, with the backend forced by ``fastgen._dispatch.use_backend``
  (the path users get, custom op and autograd included), against the plain-torch reference
  (``fastgen/reference/``, float64) on random and adversarial inputs: values and gradients.
  knn: offset clustered data (neighbour gaps far below fp32 resolution of the coordinates)
  and exact ties (lowest index wins). gaussian_nll_loss: per-element, broadcast ([N, 1], one
  dimension fewer) and float var, extreme var (below eps, 1e8), log_var, beta-NLL, full,
  every reduction (reference: ``torch.nn.functional.gaussian_nll_loss`` where it applies).
  spread_noise: the noise recovered from the same generator state (x = 0, sigma = 1), then
  Gaussian and Laplace with scalar, per-dimension and per-channel sigma (values, grad_x,
  grad_sigma) and the noise moments. spread_log_likelihood: random, per-dimension sigma,
  Laplace, far-apart sample clusters. imle_loss: plain, RS-IMLE, conditional.
  The error reported is the largest over cases of ``max|out - ref| / max|ref|`` per tensor
  (knn: indices must match exactly; distances relative per element);
* **how fast?** the median time of one call (forward + backward where the op is
  differentiable) at one mid-size shape, beside the peers present here: torch eager (the code
  a user would write without fastgen), torch.compile of it (skipped with ``--quick``) and
  faiss (knn). Triton under ``TRITON_INTERPRET=1`` is checked on small shapes, not timed.

Prints one table (op, backend, status ok / FAIL / unavailable, max error, tolerance, time);
the exit status is 0 only when every available backend is right. ``--json FILE`` writes
every row, case and timing. ``fastgen._dispatch.failures()`` (backends that "auto" stopped
using in this process after a GPU kernel failed) is printed and saved too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field

OPS = ("knn", "gaussian_nll_loss", "spread_noise", "spread_log_likelihood", "imle_loss")
DISPATCH_OP = {"knn": "knn", "gaussian_nll_loss": "gaussian_nll", "spread_noise": "spread_noise",
               "spread_log_likelihood": "spread_log_likelihood", "imle_loss": "knn"}
# tolerance on max|out - ref| / max|ref| (float32 inputs, float64 reference)
TOL = {"knn": 1e-6, "gaussian_nll_loss": 2e-5, "spread_noise": 1e-6, "spread_log_likelihood": 1e-4,
       "imle_loss": 1e-5}


@dataclass
class Row:
    op: str
    backend: str
    status: str = "ok"            # ok | FAIL | unavailable | error (peers only)
    max_err: float | None = None
    tol: float | None = None
    ms: float | None = None
    reason: str = ""
    shape: str = ""
    kind: str = "backend"          # backend | peer
    cases: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------------
def _rel(out, ref) -> float:
    import torch

    if out is None or ref is None:
        return math.inf if (out is None) != (ref is None) else 0.0
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if out.shape != ref.shape:
        return math.inf
    if ref.numel() == 0:
        return 0.0
    both_inf = torch.isinf(out) & torch.isinf(ref) & (out.sign() == ref.sign())
    if bool((torch.isnan(out) & ~torch.isnan(ref)).any()):
        return math.inf
    diff = torch.where(both_inf, torch.zeros_like(out), (out - ref).abs())
    scale = ref[torch.isfinite(ref)].abs().max() if bool(torch.isfinite(ref).any()) else torch.tensor(1.0)
    return float(diff.max() / max(float(scale), 1e-30))


def _grads(out, inputs, seed=1):
    """Gradients of <out, w> (w fixed random weights) w.r.t. the inputs that require grad."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w = torch.rand(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype) + 0.5
    need = [t for t in inputs if t is not None and t.requires_grad]
    if not need:
        return []
    return list(torch.autograd.grad((out * w).sum(), need, allow_unused=True))


def _leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad)


_REF_CACHE: dict = {}


def _ref(key, fn):
    """fn() -> (reference output, [reference gradients]), computed once per process and case (the
    float64 references cost more than the backends; every backend compares with the same)."""
    if key not in _REF_CACHE:
        out, grads = fn()
        _REF_CACHE[key] = (out.detach(), [g.detach() for g in grads])
    return _REF_CACHE[key]


# ------------------------------------------------------------------------------------------------
# cases: each returns [(name, error, detail)] for the backend currently forced
# ------------------------------------------------------------------------------------------------
def _rng(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, device, dtype=None):
    import torch

    return torch.randn(shape, generator=_rng(seed), dtype=torch.float64).to(device, dtype or torch.float32)


def knn_inputs(device, small):
    """[(name, query, key, k)]: random; offset clustered (std 1e-3 clusters at distance ~1 from
    each other, 1e3 from the origin); exact ties (integer lattice with duplicate keys)."""
    import torch

    n, m, d = (40, 90, 5) if small else (200, 1200, 16)
    out = [("random", _randn(n, d, seed=1, device=device), _randn(m, d, seed=2, device=device), 3)]
    cent = _randn(8, d, seed=3, device=device) + 1000.0
    ci = torch.arange(n, device=device) % 8
    ck = torch.arange(m, device=device) % 8
    q = cent[ci] + 1e-3 * _randn(n, d, seed=4, device=device)
    k = cent[ck] + 1e-3 * _randn(m, d, seed=5, device=device)
    out.append(("offset clusters", q, k, 4))
    lat = torch.randint(0, 3, (m // 2, d), generator=_rng(6)).to(torch.float32)
    key = torch.cat([lat, lat.flip(0)]).to(device)  # every key row twice
    query = torch.randint(0, 3, (n, d), generator=_rng(7)).to(torch.float32).to(device) + 0.5
    out.append(("ties", query, key, 5))
    out.append(("batched", _randn(3, n // 2, d, seed=8, device=device), _randn(3, m // 3, d, seed=9, device=device), 2))
    return out


def check_knn(device, small):
    import torch

    import fastgen
    from fastgen.reference import knn as ref_knn

    res = []
    for name, q, k, kk in knn_inputs(device, small):
        ql, kl = _leaf(q), _leaf(k)
        d, i = fastgen.knn(ql, kl, k=kk)
        def exact(q=q, k=k, kk=kk):
            d_, i_ = ref_knn.knn(q, k, kk)
            return i_, [d_]

        ir, (dr,) = _ref(("knn", name, device, small), exact)
        bad = int((i.cpu() != ir.cpu()).any(-1).sum())
        err = _rel(d, dr)
        rel = float(((d.cpu().double() - dr.cpu()).abs() / dr.cpu().clamp_min(1e-30)).max())
        detail = f"dist2 rel {rel:.1e}"
        if bad:
            res.append((name, math.inf, f"index differs from the exact reference on {bad} queries"))
            continue
        def grad_ref():  # gradients of dist2 through the reference's neighbours, in float64
            q64, k64 = _leaf(q.double()), _leaf(k.double())
            kb = k64 if k64.dim() == 3 else k64[None]
            qb = q64 if q64.dim() == 3 else q64[None]
            ib = ir if ir.dim() == 3 else ir[None]
            nb = torch.gather(kb[:, None].expand(-1, qb.shape[1], -1, -1), 2,
                              ib[..., None].expand(-1, -1, -1, kb.shape[-1]))
            d64 = ((qb[:, :, None, :] - nb) ** 2).sum(-1).reshape(dr.shape)
            return d64, _grads(d64, [q64, k64])

        g = _grads(d, [ql, kl])
        _, gr = _ref(("knn-grad", name, device, small), grad_ref)
        err = max(err, rel, *(_rel(a, b) for a, b in zip(g, gr)))
        res.append((name, err, detail))
    return res


def check_gaussian_nll_loss(device, small):
    import torch
    import torch.nn.functional as F

    import fastgen
    from fastgen.reference import gaussian_nll as ref

    n, d = (16, 7) if small else (200, 33)
    x = _randn(n, d, seed=11, device=device)
    t = _randn(n, d, seed=12, device=device)
    v = _randn(n, d, seed=13, device=device).abs() + 0.05
    cases = [
        ("random mean", x, t, v, dict()),
        ("sum full", x, t, v, dict(full=True, reduction="sum")),
        ("none", x, t, v, dict(reduction="none")),
        ("var [N, 1]", x, t, v[:, :1], dict()),
        ("var one dim fewer", x, t, v[:, 0], dict()),
        ("extreme var", x * 1e3, t, torch.where(torch.arange(d, device=device) % 2 == 0, 1e-9, 1e8).expand(n, d)
         .to(torch.float32).contiguous(), dict(reduction="none")),
        ("float var", x, t, 0.37, dict()),
        ("log_var beta", x, t, v.log(), dict(log_var=True, beta=0.5)),
        ("beta none", x, t, v, dict(beta=0.5, reduction="none")),
    ]
    res = []
    for name, xi, ti, vi, kw in cases:
        leaves = [_leaf(xi), _leaf(ti), _leaf(vi) if isinstance(vi, torch.Tensor) else vi]
        out = fastgen.gaussian_nll_loss(*leaves, **kw)

        def reference(xi=xi, ti=ti, vi=vi, kw=kw):
            l64 = [_leaf(xi.double()), _leaf(ti.double()), _leaf(vi.double()) if isinstance(vi, torch.Tensor) else vi]
            if kw.get("log_var") or kw.get("beta"):
                r = ref.gaussian_nll_loss(*l64, **kw)
            else:
                r = F.gaussian_nll_loss(*l64, **kw)  # the drop-in's oracle: torch itself
            return r, _grads(r, [a for a in l64 if isinstance(a, torch.Tensor)])

        r, gr = _ref(("nll", name, device, small), reference)
        tens = [a for a in leaves if isinstance(a, torch.Tensor)]
        err = max([_rel(out, r)] + [_rel(a, b) for a, b in zip(_grads(out, tens), gr)])
        res.append((name, err, ""))
    return res


def check_spread_noise(device, small):
    import torch

    import fastgen
    from fastgen.reference.spread_noise import spread_noise_reference, unit_variance

    res = []
    shape = (64, 3, 4, 4) if small else (64, 3, 8, 16)
    for kind in ("gaussian", "laplace"):
        for sname, sigma in (("float", 0.3), ("scalar tensor", torch.tensor(0.7)),
                             ("per-channel", _randn(3, 1, 1, seed=21, device=device).abs() + 0.1),
                             ("per-dimension", _randn(16 if not small else 4, seed=22, device=device).abs() + 0.1)):
            x = _randn(*shape, seed=23, device=device)
            gen = torch.Generator().manual_seed(1234)
            eps = fastgen.spread_noise(torch.zeros_like(x), 1.0, kind=kind, generator=gen)
            gen = torch.Generator().manual_seed(1234)
            xl = _leaf(x)
            sl = _leaf(sigma.to(device)) if isinstance(sigma, torch.Tensor) else sigma
            y = fastgen.spread_noise(xl, sl, kind=kind, generator=gen)
            x64 = _leaf(x.double())
            s64 = _leaf(sigma.double().to(device)) if isinstance(sigma, torch.Tensor) else sigma
            r = spread_noise_reference(x64, s64, eps.double())
            tens = [a for a in (xl, sl) if isinstance(a, torch.Tensor)]
            tens64 = [a for a in (x64, s64) if isinstance(a, torch.Tensor)]
            g, gr = _grads(y, tens), _grads(r, tens64)
            err = max(_rel(y, r), _rel(g[0], gr[0]))
            if isinstance(sigma, torch.Tensor):
                # grad_sigma = sum(eps * w) over sigma's broadcast dims: a sum whose terms cancel,
                # so its error is measured against sum(|eps| w) (each term's own rounding, the
                # regenerated noise's last-bit differences included), not against the sum itself
                scale = _grads(spread_noise_reference(x64.detach(), s64, eps.double().abs()), [s64])[0]
                err = max(err, float(((g[1].double() - gr[1]).abs() / scale.abs().clamp_min(1e-30)).max()))
            res.append((f"{kind} {sname}", err, ""))
        # the law: moments of 2^16 draws within 6 standard errors
        e = fastgen.spread_noise(torch.zeros(1 << 16, device=device), 1.0, kind=kind,
                                 generator=torch.Generator().manual_seed(7)).double().cpu()
        var = unit_variance(kind)
        kurt4 = 3.0 if kind == "gaussian" else 24.0
        n = e.numel()
        z_mean = float(e.mean()) / math.sqrt(var / n)
        z_var = (float(e.var()) - var) / math.sqrt((kurt4 - var * var) / n)
        ok = abs(z_mean) < 6 and abs(z_var) < 6
        res.append((f"{kind} moments", 0.0 if ok else math.inf, f"z(mean) {z_mean:.1f}, z(var) {z_var:.1f}"))
    return res


def check_spread_log_likelihood(device, small):
    import torch

    import fastgen
    from fastgen.reference.spread_log_likelihood import spread_log_likelihood_reference as ref

    n, s, d = (20, 30, 4) if small else (200, 300, 16)
    res = []
    far = torch.arange(s, device=device)[:, None].remainder(5).to(torch.float32) * 40.0  # clusters 40 sigma apart
    cases = [("random gaussian", _randn(n, d, seed=31, device=device), _randn(s, d, seed=32, device=device), 0.8,
              "gaussian"),
             ("per-dimension sigma", _randn(n, d, seed=33, device=device), _randn(s, d, seed=34, device=device),
              _randn(d, seed=35, device=device).abs() + 0.3, "gaussian"),
             ("laplace per-dimension", _randn(n, d, seed=36, device=device), _randn(s, d, seed=37, device=device),
              _randn(d, seed=38, device=device).abs() + 0.3, "laplace"),
             ("far-apart samples", _randn(n, d, seed=39, device=device) + 20.0,  # every kernel value underflows
              far + 0.5 * _randn(s, d, seed=40, device=device), torch.tensor([1.0], device=device), "gaussian")]
    for name, y, x, sigma, kind in cases:
        yl, xl = _leaf(y), _leaf(x)
        sl = _leaf(sigma) if isinstance(sigma, torch.Tensor) else sigma
        out = fastgen.spread_log_likelihood(yl, xl, sl, kind=kind)

        def reference(y=y, x=x, sigma=sigma, kind=kind):
            y64, x64 = _leaf(y.double()), _leaf(x.double())
            s64 = _leaf(sigma.double()) if isinstance(sigma, torch.Tensor) else sigma
            r = ref(y64, x64, s64, kind)
            return r, _grads(r, [a for a in (y64, x64, s64) if isinstance(a, torch.Tensor)])

        r, gr = _ref(("sll", name, device, small), reference)
        tens = [a for a in (yl, xl, sl) if isinstance(a, torch.Tensor)]
        err = max([_rel(out, r)] + [_rel(a, b) for a, b in zip(_grads(out, tens), gr)])
        if name == "far-apart samples":
            # log-kernel values near -800 there: float32 carries ~800 * 2^-24 = 5e-5 absolute error
            # into each softmax weight exp(a - lse), hence into the gradients (float64 does not)
            res.append((name, err, "", 1e-3))
        else:
            res.append((name, err, ""))
    return res


def check_imle_loss(device, small):
    import fastgen
    from fastgen.reference import imle_loss as ref

    n, s, d = (12, 30, 6) if small else (128, 1024, 32)
    res = []
    cases = [("plain", _randn(s, d, seed=41, device=device), _randn(n, d, seed=42, device=device), dict()),
             ("rs-imle", _randn(s, d, seed=43, device=device), _randn(n, d, seed=44, device=device),
              dict(rejection_radius=float(d) ** 0.5)),
             ("conditional", _randn(4, s // 4, d, seed=45, device=device), _randn(4, n // 4, d, seed=46, device=device),
              dict(conditional=True)),
             ("offset images", _randn(s, 2, 3, 3, seed=47, device=device) * 1e-3 + 500.0,
              _randn(n, 2, 3, 3, seed=48, device=device) * 1e-3 + 500.0, dict())]
    for name, samples, data, kw in cases:
        sl = _leaf(samples)
        out = fastgen.imle_loss(sl, data, **kw)

        def reference(samples=samples, data=data, kw=kw):
            s64 = _leaf(samples.double())
            r = ref.imle_loss(s64, data.double(), **kw)
            return r, _grads(r, [s64])

        r, gr = _ref(("imle", name, device, small), reference)
        err = max(_rel(out, r), *(_rel(a, b) for a, b in zip(_grads(out, [sl]), gr)))
        res.append((name, err, ""))
    return res


CHECKS = {"knn": check_knn, "gaussian_nll_loss": check_gaussian_nll_loss, "spread_noise": check_spread_noise,
          "spread_log_likelihood": check_spread_log_likelihood, "imle_loss": check_imle_loss}


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, reps: int, budget_s: float = 3.0) -> float:
    """Median milliseconds of fn() over up to ``reps`` runs after one warm-up (stops early when
    the runs exceed ``budget_s``)."""
    fn()
    _sync(device)
    times = []
    t_end = time.perf_counter() + budget_s
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > t_end and len(times) >= 3:
            break
    return statistics.median(times)


def workloads(device, quick):
    """{op: (shape text, fastgen fn, {peer name: fn})}: one forward + backward call each."""
    import torch
    import torch.nn.functional as F

    import fastgen

    big = device == "cuda"
    out = {}
    if big:
        N, M, D = 8192, 65536, 128
    else:
        N, M, D = (512, 2048, 64) if quick else (2048, 16384, 128)
    q = _randn(N, D, seed=51, device=device)
    k = _randn(M, D, seed=52, device=device)

    def mm_topk(q, k):
        d = (q * q).sum(1, keepdim=True) - 2 * q @ k.T + (k * k).sum(1)
        return d.topk(1, dim=1, largest=False)

    peers = {"torch eager (mm + topk)": lambda: mm_topk(q, k)}
    peers["torch.compile (mm + topk)"] = ("compile", mm_topk, (q, k))
    try:
        import faiss

        if device == "cpu" or (hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0):
            def faiss_search():
                index = faiss.IndexFlatL2(D)
                if device == "cuda":
                    index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
                    index.add(k.cpu().numpy())
                    return index.search(q.cpu().numpy(), 1)
                index.add(k.numpy())
                return index.search(q.numpy(), 1)
            peers["faiss IndexFlatL2"] = faiss_search
    except Exception:  # noqa: BLE001 - faiss is optional
        pass
    out["knn"] = (f"{N}x{M} D={D} k=1", lambda: fastgen.knn(q, k, k=1), peers)

    rows, cols = (4096, 4096) if big else ((256, 1024) if quick else (1024, 4096))
    x = _leaf(_randn(rows, cols, seed=53, device=device))
    t = _randn(rows, cols, seed=54, device=device)
    v = _leaf(_randn(rows, cols, seed=55, device=device).abs() + 0.1)

    def nll_step(f):
        return lambda: torch.autograd.grad(f(x, t, v), (x, v))

    out["gaussian_nll_loss"] = (f"{rows}x{cols} fwd+bwd", nll_step(fastgen.gaussian_nll_loss),
                                {"torch eager (F.gaussian_nll_loss)": nll_step(F.gaussian_nll_loss),
                                 "torch.compile (F.gaussian_nll_loss)": ("compile_step", F.gaussian_nll_loss,
                                                                         (x, t, v))})
    n = (1 << 24) if big else ((1 << 18) if quick else (1 << 22))
    xs = _randn(n, seed=56, device=device)

    def noise_ref(x, s):
        return x + s * torch.randn_like(x)

    out["spread_noise"] = (f"{n} fwd, sigma 0.5", lambda: fastgen.spread_noise(xs, 0.5),
                           {"torch eager (x + s * randn)": lambda: noise_ref(xs, 0.5),
                            "torch.compile (x + s * randn)": ("compile", noise_ref, (xs, 0.5))})
    Ny, S, Dy = (4096, 4096, 32) if big else ((128, 512, 16) if quick else (1024, 4096, 16))
    y = _leaf(_randn(Ny, Dy, seed=57, device=device))
    smp = _leaf(_randn(S, Dy, seed=58, device=device))

    def sll_ref(y, smp):
        return torch.logsumexp(-0.5 * torch.cdist(y / 0.7, smp / 0.7) ** 2, 1).sum()

    out["spread_log_likelihood"] = (
        f"{Ny}x{S} D={Dy} fwd+bwd",
        lambda: torch.autograd.grad(fastgen.spread_log_likelihood(y, smp, 0.7).sum(), (y, smp)),
        {"torch eager (cdist + logsumexp)": lambda: torch.autograd.grad(sll_ref(y, smp), (y, smp)),
         "torch.compile (cdist + logsumexp)": ("compile_step2", sll_ref, (y, smp))})
    Si, Ni, Di = (16384, 4096, 256) if big else ((512, 128, 64) if quick else (4096, 1024, 64))
    si = _leaf(_randn(Si, Di, seed=59, device=device))
    di = _randn(Ni, Di, seed=60, device=device)

    def imle_ref(s, d):
        return torch.cdist(d, s).min(1).values.square().mean()

    out["imle_loss"] = (f"{Si} samples x {Ni} data D={Di} fwd+bwd",
                        lambda: torch.autograd.grad(fastgen.imle_loss(si, di), si),
                        {"torch eager (cdist + min)": lambda: torch.autograd.grad(imle_ref(si, di), si),
                         "torch.compile (cdist + min)": ("compile_step1", imle_ref, (si, di))})
    return out


def _peer_fn(spec):
    """A peer entry is a callable, or ("compile"...) tuples built lazily (torch.compile)."""
    import torch

    if callable(spec):
        return spec
    how, f, args = spec
    cf = torch.compile(f)
    if how == "compile":
        return lambda: cf(*args)
    if how == "compile_step":  # gaussian_nll: grads w.r.t. input and var
        return lambda: torch.autograd.grad(cf(*args), (args[0], args[2]))
    if how == "compile_step1":
        return lambda: torch.autograd.grad(cf(*args), args[0])
    return lambda: torch.autograd.grad(cf(*args), args)


# ------------------------------------------------------------------------------------------------
def backends_of(op: str, device: str) -> list[str]:
    from fastgen import _dispatch

    dop = DISPATCH_OP[op]
    order = list(_dispatch.ORDER.get(dop, {}).get(device, ()))
    rest = [b for b in _dispatch.BACKENDS if (dop, b) in _dispatch._IMPLS and b not in order]
    return order + rest


def run_check(device: str = "cpu", ops=OPS, quick: bool = False, log=print, on_op=None) -> tuple[list[Row], dict]:
    """Check and time every backend of ``ops`` on ``device``; returns (rows, environment).
    ``on_op(rows)`` is called after each op (``fastgen check --json`` saves what it has, so that a
    run cut short by a deadline keeps its finished ops)."""
    import torch

    from fastgen import _dispatch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastgen check: --device cuda, but torch sees no CUDA device")
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    rows: list[Row] = []
    work = None
    reps = 3 if quick else 20
    budget = 1.0 if quick else 3.0
    for op in ops:
        dop = DISPATCH_OP[op]
        for b in ["auto"] + backends_of(op, device):
            row = Row(op, b, tol=TOL[op])
            rows.append(row)
            if b == "auto":  # what users get by default (the safe fallback included)
                why = None
                row.reason = f"picks {_dispatch.select(dop, 'auto', device)[0]} (without shape hints)"
            else:
                why = _dispatch.unavailable_reason(dop, b, device)
            if why is not None:
                row.status, row.reason = "unavailable", why
                continue
            small = b == "triton" and device == "cpu"  # the interpreter: small shapes
            t0 = time.perf_counter()
            forced = _dispatch.use_backend(b, op=dop) if b != "auto" else contextlib.nullcontext()
            try:
                with forced, warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    cases = CHECKS[op](device, small)
            except Exception as e:  # noqa: BLE001 - a backend that raises is a failure, reported
                row.status, row.reason = "FAIL", f"{type(e).__name__}: {e}".splitlines()[0][:200]
                continue
            cases = [tuple(c) + (TOL[op],) * (4 - len(c)) for c in cases]  # (name, err, detail, tol)
            row.cases = [dict(case=c, err=e, detail=dt, tol=tl) for c, e, dt, tl in cases]
            row.max_err = max(e for _, e, _, tl in cases if tl == TOL[op])
            row.reason = "; ".join([row.reason] * bool(row.reason) + [f"{c} {e:.1e} (tol {tl:.0e})" for c, e, _, tl in cases
                                                                      if tl != TOL[op]])
            bad = [(c, e, dt) for c, e, dt, tl in cases if not e <= tl]
            if bad:
                row.status = "FAIL"
                row.reason = "; ".join(f"{c}: {dt or f'err {e:.2e}'}" for c, e, dt in bad)[:300]
            log(f"  {op:<22} {b:<7} {row.status:<5} max err {row.max_err:.1e} "
                f"({len(cases)} cases, {time.perf_counter() - t0:.1f} s)")
            if b == "triton" and interp and device == "cpu":
                row.reason = "; ".join([row.reason] * bool(row.reason) + ["interpreted (TRITON_INTERPRET=1): not timed"])
                continue
            if work is None:
                work = workloads(device, quick)
            shape, fn, _ = work[op]
            row.shape = shape
            forced = _dispatch.use_backend(b, op=dop) if b != "auto" else contextlib.nullcontext()
            try:
                with forced:
                    row.ms = time_ms(fn, device, reps, budget)
            except Exception as e:  # noqa: BLE001
                row.status, row.reason = "FAIL", f"timing run: {type(e).__name__}: {e}".splitlines()[0][:200]
        if work is None:
            work = workloads(device, quick)
        shape, _, peers = work[op]
        for name, spec in peers.items():
            prow = Row(op, name, kind="peer", shape=shape)
            rows.append(prow)
            if quick and not callable(spec):
                prow.status, prow.reason = "skipped", "torch.compile: not with --quick"
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    prow.ms = time_ms(_peer_fn(spec), device, reps, budget)
                prow.status = "timed"
            except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
                prow.status, prow.reason = "error", f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if on_op is not None:
            on_op(rows)
    return rows, environment(device)


def _clean(o):
    """Strict JSON: inf / nan as strings."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def write_json(path: str, rows: list[Row], env: dict, *, quick: bool, seconds: float, complete: bool) -> None:
    from fastgen import _dispatch

    ok = all(r.status != "FAIL" for r in rows if r.kind == "backend")
    data = dict(ok=ok if complete else None, complete=complete, seconds=seconds, env=env, quick=quick,
                rows=[asdict(r) for r in rows],
                failures=[dict(op=o, backend=b, device=d, error=w) for (o, b, d), w in _dispatch.failures().items()])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_clean(data), f, indent=1, default=str)
    os.replace(tmp, path)


def environment(device: str) -> dict:
    import torch

    import fastgen

    env = dict(fastgen=fastgen.__version__, torch=torch.__version__, python=platform.python_version(),
               device=device, cpu=_cpu_name(), isa=_cpu_isa(), threads=torch.get_num_threads(),
               triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1")
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        env["triton"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   cuda=torch.version.cuda)
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_isa() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "").split()
    except OSError:
        return platform.machine()
    return "AVX-512" if "avx512f" in flags else ("AVX2" if "avx2" in flags else platform.machine())


def format_table(rows: list[Row]) -> str:
    def num(x, f):
        return "-" if x is None else (("inf" if math.isinf(x) else format(x, f)))

    lines = [f"{'op':<22} {'backend':<42} {'status':<11} {'max err':>8} {'tol':>7} {'ms':>9}  notes"]
    for r in rows:
        note = r.reason
        if r.shape and r.ms is not None:
            note = (note + "; " if note else "") + r.shape
        name = r.backend if r.kind == "backend" else f"peer: {r.backend}"
        lines.append(f"{r.op:<22} {name:<42} {r.status:<11} {num(r.max_err, '.1e'):>8} "
                     f"{num(r.tol if r.kind == 'backend' else None, '.0e'):>7} {num(r.ms, '.2f'):>9}  {note}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when torch sees a GPU, else cpu")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--quick", action="store_true", help="smaller timing shapes, no torch.compile peers")
    p.add_argument("--json", default=None, help="write every row, case and timing to this file")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastgen check", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_main(p.parse_args(argv), p)


def run_main(a, p) -> int:
    """`fastgen check` with parsed arguments ``a`` (see :func:`add_arguments`)."""
    import torch

    from fastgen import _dispatch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ops = [o.strip() for o in a.ops.split(",") if o.strip()]
    for o in ops:
        if o not in OPS:
            p.error(f"--ops: unknown op {o!r}; ops are {', '.join(OPS)}")
    t0 = time.perf_counter()
    env = environment(device)
    where = env.get("gpu") or env["cpu"]
    print(f"fastgen check: {device} ({where}, {env['isa']}, {env['threads']} CPU threads), torch {env['torch']}, "
          f"triton {env['triton']}{' (TRITON_INTERPRET=1)' if env['triton_interpret'] else ''}", flush=True)
    def save_partial(rows):
        if a.json:
            write_json(a.json, rows, env, quick=a.quick, seconds=time.perf_counter() - t0, complete=False)

    rows, env = run_check(device, ops, a.quick, log=lambda s: print(s, flush=True), on_op=save_partial)
    seconds = time.perf_counter() - t0
    ok = all(r.status != "FAIL" for r in rows if r.kind == "backend")
    print()
    print(format_table(rows))
    fails = _dispatch.failures()
    if fails:
        print("backends 'auto' stopped using in this process:")
        for (op, b, dev), why in sorted(fails.items()):
            print(f"  {op} {b} on {dev}: {why}")
    n_ok = sum(r.status == "ok" for r in rows if r.kind == "backend" and r.backend != "auto")
    n_av = sum(r.status in ("ok", "FAIL") for r in rows if r.kind == "backend" and r.backend != "auto")
    print(f"fastgen check: {'PASS' if ok else 'FAIL'}: {n_ok}/{n_av} available backends right "
          f"({len(ops)} ops, {seconds:.0f} s)")
    if a.json:
        write_json(a.json, rows, env, quick=a.quick, seconds=seconds, complete=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
