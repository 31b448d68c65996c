"""The torch.func / autograd matrix of the public ops, measured: `python -m bench.func_matrix [--backend B]`.

For each public op, on small float64 inputs (data where a 1e-6 perturbation cannot change a
nearest neighbour), runs and prints as a Markdown table:

* opcheck     ``torch.library.opcheck`` on the custom op the public function calls (recorded with a
              TorchDispatchMode while the function runs);
* grad        ``gradcheck`` (reverse mode);
* double bwd  ``gradgradcheck``;
* jvp         ``gradcheck(check_forward_ad=True)`` and ``torch.func.jvp`` against the reference;
* vmap        ``torch.func.vmap`` against a Python loop;
* batched grad ``gradcheck(check_batched_grad=True, check_batched_forward_grad=True)``;
* hessian     ``torch.func.hessian`` (forward-over-reverse) against the reference's;
* per-sample  ``vmap(grad(f))`` against a loop of ``torch.autograd.grad``.

A cell is "yes" when the check passes, else the exception type (first line in the log below the
table). The backend is the one "auto" picks here, or ``--backend`` (via ``use_backend``).
"""
from __future__ import annotations

import argparse
import sys
import traceback

import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import fastgen
from fastgen import _dispatch
from fastgen.reference import gaussian_nll as ref_nll
from fastgen.reference import imle_loss as ref_imle
from fastgen.reference import knn as ref_knn
from fastgen.reference import spread_log_likelihood as ref_sll
from fastgen.reference import spread_noise as ref_noise

DT = torch.float64
CHECKS = ["opcheck", "grad", "double bwd", "jvp", "vmap", "batched grad", "hessian", "per-sample"]


class _Record(TorchDispatchMode):
    """Records the first fastgen:: public (non-underscore) op called."""

    def __init__(self):
        super().__init__()
        self.call = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if self.call is None and name.startswith("fastgen::") and not name.split("::")[1].startswith("_"):
            self.call = (func, args, kwargs or {})
        return func(*args, **(kwargs or {}))


def _seeded():
    return torch.Generator().manual_seed(1234)


def _grid(n, d, spacing=1.0, offset=0.0, seed=0):
    """n well-separated points in d dims (a perturbed lattice): neighbours stable under 1e-6."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(max(n * 4, 64), generator=g)[:n]
    side = int(round(max(n * 4, 64) ** (1.0 / d))) + 1
    coords = torch.stack([(idx // side ** j) % side for j in range(d)], 1).to(DT)
    return coords * spacing + offset + 0.05 * torch.rand(n, d, generator=g, dtype=DT)


def cases():
    """op -> (f(*inputs) -> tensor, reference f, inputs, batched inputs for vmap [V, ...] per input)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, dtype=DT, generator=g)
    t = torch.randn(4, 3, dtype=DT, generator=g)
    v = torch.rand(4, 3, dtype=DT, generator=g) + 0.5
    y = torch.randn(5, 3, dtype=DT, generator=g)
    xs = torch.randn(6, 3, dtype=DT, generator=g)
    s = torch.tensor([0.7, 0.9, 1.1], dtype=DT)
    q = _grid(5, 3, seed=1) + 0.3
    k = _grid(7, 3, seed=2)
    samples = _grid(7, 3, seed=3)
    data = _grid(4, 3, seed=4) + 0.3

    def noise(x, s):
        return fastgen.spread_noise(x, s, generator=_seeded())

    def noise_ref(x, s):
        eps = ref_noise.sample_noise_reference(x.shape, "gaussian", generator=_seeded(), dtype=x.dtype)
        return ref_noise.spread_noise_reference(x, s, eps)

    return {
        "gaussian_nll_loss": (lambda a, b, c: fastgen.gaussian_nll_loss(a, b, c),
                              lambda a, b, c: ref_nll.gaussian_nll_loss(a, b, c), (x, t, v)),
        "spread_noise": (noise, None, (x, s)),
        "spread_log_likelihood": (lambda a, b, c: fastgen.spread_log_likelihood(a, b, c).sum(),
                                  lambda a, b, c: ref_sll.spread_log_likelihood_reference(a, b, c).sum(),
                                  (y, xs, s)),
        "knn": (lambda a, b: fastgen.knn(a, b, 2)[0],
                lambda a, b: ref_knn.knn(a, b, 2)[0], (q, k)),
        "imle_loss": (lambda a, b: fastgen.imle_loss(a, b),
                      lambda a, b: ref_imle.imle_loss(a, b), (samples, data)),
    }


def _scalar(f):
    return lambda *a: f(*a).sum()


def run_checks(op, f, ref, inputs):
    res = {}
    errs = {}
    # imle_loss: data is a target (no gradient by design): differentiate w.r.t. samples only
    n_diff = 1 if op == "imle_loss" else len(inputs)
    req = [a.detach().clone().requires_grad_(i < n_diff) for i, a in enumerate(inputs)]

    def attempt(name, fn):
        try:
            ok = fn()
            res[name] = "yes" if ok is not False else "WRONG"
        except Exception as e:  # noqa: BLE001 - the table reports it
            res[name] = type(e).__name__
            errs[name] = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[0][:200]

    def opcheck():
        rec = _Record()
        with rec:
            f(*[a.detach() for a in inputs])
        if rec.call is None:
            raise RuntimeError("no public fastgen op was called")
        func, args, kwargs = rec.call
        args = tuple(a.detach().clone().requires_grad_(i < n_diff) if isinstance(a, torch.Tensor)
                     and a.is_floating_point() else a for i, a in enumerate(args))
        out = torch.library.opcheck(func, args, kwargs)
        bad = {k: v for k, v in out.items() if v != "SUCCESS"}
        if bad:
            raise AssertionError(str(bad))
        return True

    attempt("opcheck", opcheck)
    attempt("grad", lambda: gradcheck(f, req, check_backward_ad=True))
    attempt("double bwd", lambda: gradgradcheck(f, req, check_fwd_over_rev=True))

    def jvp():
        gradcheck(f, req, check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)
        if ref is not None:
            tang = tuple(torch.randn_like(a) for a in inputs[:n_diff])
            rest = inputs[n_diff:]
            _, jf = torch.func.jvp(lambda *a: f(*a, *rest), tuple(inputs[:n_diff]), tang)
            _, jr = torch.func.jvp(lambda *a: ref(*a, *rest), tuple(inputs[:n_diff]), tang)
            torch.testing.assert_close(jf, jr)
        return True

    attempt("jvp", jvp)

    def vmap():
        V = 3
        batched = [torch.stack([a + 0.001 * i for i in range(V)]) for a in inputs]
        kw = {"randomness": "same"} if op == "spread_noise" else {}
        out = torch.func.vmap(f, **kw)(*batched)
        loop = torch.stack([f(*[b[i] for b in batched]) for i in range(V)])
        torch.testing.assert_close(out, loop)
        return True

    attempt("vmap", vmap)
    attempt("batched grad", lambda: gradcheck(f, req, check_batched_grad=True, check_forward_ad=True,
                                              check_batched_forward_grad=True))

    def hessian():
        fs = _scalar(f)
        h = torch.func.hessian(lambda a: fs(a, *inputs[1:]))(inputs[0])
        if ref is not None:
            hr = torch.func.hessian(lambda a: _scalar(ref)(a, *inputs[1:]))(inputs[0])
            torch.testing.assert_close(h, hr)
        return True

    attempt("hessian", hessian)

    def per_sample():
        fs = _scalar(f)
        V = 3
        a0 = torch.stack([inputs[0] + 0.001 * i for i in range(V)])
        kw = {"randomness": "same"} if op == "spread_noise" else {}
        gs = torch.func.vmap(torch.func.grad(lambda a: fs(a, *inputs[1:])), **kw)(a0)
        loop = []
        for i in range(V):
            a = a0[i].clone().requires_grad_()
            loop.append(torch.autograd.grad(fs(a, *inputs[1:]), a)[0])
        torch.testing.assert_close(gs, torch.stack(loop))
        return True

    attempt("per-sample", per_sample)
    return res, errs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--ops", default="", help="comma-separated subset")
    args = ap.parse_args(argv)
    only = [o for o in args.ops.split(",") if o]
    rows, logs = [], []
    for op, (f, ref, inputs) in cases().items():
        if only and op not in only:
            continue
        if args.backend != "auto":
            name = {"gaussian_nll_loss": "gaussian_nll", "imle_loss": "knn"}.get(op, op)
            ctx = _dispatch.use_backend(args.backend, name)
        else:
            import contextlib

            ctx = contextlib.nullcontext()
        with ctx:
            res, errs = run_checks(op, f, ref, inputs)
        rows.append((op, res))
        logs += [f"{op} / {c}: {m}" for c, m in errs.items()]
    print(f"backend: {args.backend}; torch {torch.__version__}; float64\n")
    print("| op | " + " | ".join(CHECKS) + " |")
    print("|---|" + "---|" * len(CHECKS))
    for op, res in rows:
        print(f"| `{op}` | " + " | ".join(res.get(c, "-") for c in CHECKS) + " |")
    if logs:
        print("\n" + "\n".join(logs))
    return 0 if all(v == "yes" for _, r in rows for v in r.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
