"""Smoke test of an installed fastgen wheel: every compiled CPU kernel of fastgen._C against the
plain-torch / numpy references, on the CPU path the extension picked for this machine.

Run by tools/check_wheel.sh in fresh venvs (torch 2.13.0, torch 2.14.1) and under
`qemu-x86_64 -cpu Haswell` / `-cpu Nehalem`. Needs only torch, numpy and the installed fastgen
(no pytest, no compiler); small shapes, so that it finishes in a few minutes under emulation.

    python tools/wheel_smoke.py [--expect-isa baseline|avx2|avx512] [--allow-source-tree]

Exit status 0 when every check passes; prints one line per check and a summary line
`wheel_smoke: N passed, 0 failed (...)`.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback

import torch

RESULTS: list[tuple[str, bool, str]] = []


def check(name):
    def deco(fn):
        t0 = time.perf_counter()
        try:
            fn()
            RESULTS.append((name, True, ""))
            print(f"  ok    {name}  ({time.perf_counter() - t0:.2f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            RESULTS.append((name, False, f"{type(e).__name__}: {e}"))
            print(f"  FAIL  {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        return fn
    return deco


def close(a, b, rtol, atol, what):
    a = a.detach().double()
    b = b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}")
    err = (a - b).abs()
    tol = atol + rtol * b.abs()
    if not bool((err <= tol).all()):
        i = int((err - tol).argmax())
        raise AssertionError(f"{what}: max excess {float((err - tol).flatten()[i]):.3g} at flat index {i}: "
                             f"{float(a.flatten()[i])!r} vs {float(b.flatten()[i])!r}")


# --------------------------------------------------------------------------------------- checks
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect-isa", default=os.environ.get("FASTGEN_SMOKE_EXPECT_ISA"),
                    help="fail unless fastgen reports this CPU path (baseline / avx2 / avx512)")
    ap.add_argument("--allow-source-tree", action="store_true",
                    help="do not insist that fastgen is imported from site-packages")
    args = ap.parse_args()

    import fastgen
    from fastgen import _backend
    from fastgen._dispatch import use_backend
    from fastgen.reference.gaussian_nll import gaussian_nll_loss as nll_ref
    from fastgen.reference.knn import knn as knn_ref
    from fastgen.reference.spread_log_likelihood import spread_log_likelihood_reference as sll_ref
    from fastgen.reference.spread_noise import stream_noise_reference

    torch.manual_seed(0)
    ops = torch.ops.fastgen
    print(f"wheel_smoke: python {platform.python_version()} torch {torch.__version__} "
          f"machine {platform.machine()} threads {torch.get_num_threads()}", flush=True)

    @check("import fastgen._C from the installed wheel (abi3 build)")
    def _():
        mod = _backend.load_ext()
        if mod is None:
            raise AssertionError(_backend.ext_error())
        f = mod.__file__
        print(f"        fastgen._C = {f}")
        if not args.allow_source_tree and "site-packages" not in f:
            raise AssertionError("fastgen._C is not the installed wheel's (run outside the source tree)")
        if ".abi3." not in os.path.basename(f):
            raise AssertionError(f"not a limited-API (abi3) build: {os.path.basename(f)}")
        for name in ("_knn_kernel", "_gaussian_nll_kernel", "_gaussian_nll_backward_kernel", "_spread_noise_kernel",
                     "_spread_noise_grad_sigma_kernel", "_spread_log_likelihood_kernel",
                     "_spread_log_likelihood_backward_kernel"):
            if not _backend.has_kernel(name, "CPU"):
                raise AssertionError(f"fastgen::{name} has no CPU kernel")

    @check("CPU ISA path in use")
    def _():
        isa = _backend.cpu_isa()
        print(f"        cpu isa = {isa!r} (FASTGEN_CPU_ISA={os.environ.get('FASTGEN_CPU_ISA')!r})")
        if args.expect_isa and isa != args.expect_isa:
            raise AssertionError(f"expected the {args.expect_isa} path, fastgen reports {isa!r}")

    @check("knn kernel: float32 / float64 / float16 / bfloat16, k = 1 and 5, offset clustered data")
    def _():
        g = torch.Generator().manual_seed(1)
        for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for (B, N, M, D, k) in ((1, 40, 300, 3, 1), (2, 33, 257, 64, 5), (1, 9, 70, 131, 5)):
                centres = torch.randn(4, D, generator=g, dtype=torch.float64) * 3
                kk = centres[torch.randint(0, 4, (B, M), generator=g)] + 0.3 * torch.randn(B, M, D, generator=g,
                                                                                        dtype=torch.float64)
                q = centres[torch.randint(0, 4, (B, N), generator=g)] + 0.3 * torch.randn(B, N, D, generator=g,
                                                                                       dtype=torch.float64)
                off = 100.0 if dt in (torch.float32, torch.float64) else 0.0
                q, kk = (q + off).to(dt), (kk + off).to(dt)
                d, i = ops._knn_kernel(q, kk, k)
                rd, ri = knn_ref(q, kk, k)
                if d.dtype != (torch.float64 if dt == torch.float64 else torch.float32) or i.dtype != torch.int64:
                    raise AssertionError(f"{dt}: output dtypes {d.dtype}, {i.dtype}")
                if not torch.equal(i, ri):
                    raise AssertionError(f"{dt} {(B, N, M, D, k)}: {int((i != ri).sum())} neighbour indices differ")
                close(d, rd, 1e-6 if dt != torch.float64 else 1e-12, 0, f"knn dist2 {dt} {(B, N, M, D, k)}")
        # public API, 2-D inputs, gradient of dist2
        q = torch.randn(20, 8, generator=g, requires_grad=True)
        kk = torch.randn(50, 8, generator=g)
        d, i = fastgen.knn(q, kk, 3, backend="cpu")
        d.sum().backward()
        close(q.grad, (2 * (q[:, None, :] - kk[i])).sum(1), 1e-5, 1e-5, "knn grad query")

    @check("gaussian_nll kernels: mean / sum / none, full, log_var, beta, broadcast var; values and grads")
    def _():
        g = torch.Generator().manual_seed(2)
        cases = [((6, 40), (6, 40)), ((6, 40), (6, 1)), ((3, 5, 7), (3, 1, 7)), ((300,), (300,))]
        for dt, tol in ((torch.float32, 2e-5), (torch.float64, 1e-10)):
            for shape, vshape in cases:
                for reduction in ("mean", "sum", "none"):
                    for full, log_var, beta in ((False, False, 0.0), (True, False, 0.0), (False, True, 0.0),
                                                (True, False, 0.5)):
                        x = torch.randn(shape, generator=g, dtype=dt)
                        t = torch.randn(shape, generator=g, dtype=dt)
                        v = (torch.randn(vshape, generator=g, dtype=dt) if log_var
                             else torch.rand(vshape, generator=g, dtype=dt) + 0.05)
                        xs = [a.clone().requires_grad_() for a in (x, t, v)]
                        rs = [a.double().clone().requires_grad_() for a in (x, t, v)]
                        with use_backend("cpu", "gaussian_nll"):
                            out = fastgen.gaussian_nll_loss(*xs, full=full, reduction=reduction, log_var=log_var,
                                                            beta=beta)
                        ref = nll_ref(*rs, full=full, reduction=reduction, log_var=log_var, beta=beta)
                        what = f"nll {dt} {shape}/{vshape} {reduction} full={full} log_var={log_var} beta={beta}"
                        close(out, ref, tol, tol, what)
                        w = torch.randn(out.shape, generator=g, dtype=torch.float64)
                        (out.double() * w).sum().backward()
                        (ref * w).sum().backward()
                        for a, r, n in zip(xs, rs, ("input", "target", "var")):
                            close(a.grad, r.grad, 10 * tol, 10 * tol, f"{what} grad {n}")

    @check("spread_noise kernels: the Philox stream (gaussian, laplace), sigma broadcast, grad_sigma")
    def _():
        seed, offset = 0x1234_5678_9ABC_DEF1 - (1 << 63), (1 << 33) + 4096
        for kind in (0, 1):
            for dt in (torch.float32, torch.float64):
                n = 3 * 256 + 77
                eps_ref = torch.from_numpy(stream_noise_reference(n, kind, seed, offset))
                acc = torch.float64 if dt == torch.float64 else torch.float32
                y = ops._spread_noise_kernel(torch.zeros(n, dtype=dt), torch.ones(1, dtype=acc), kind, seed, offset)
                close(y, eps_ref, 2e-5, 2e-5, f"spread_noise eps kind={kind} {dt}")
                # x + sigma * eps with a per-column sigma [1, 5] over x [n // 5, 5]
                rows = n // 5
                x = torch.randn(rows, 5, dtype=dt)
                sig = torch.rand(1, 5, dtype=acc) + 0.1
                y = ops._spread_noise_kernel(x, sig, kind, seed, offset)
                e = eps_ref[: rows * 5].reshape(rows, 5)
                close(y, x.double() + sig.double() * e, 2e-5, 2e-5, f"spread_noise y kind={kind} {dt}")
                gy = torch.randn(rows, 5, dtype=dt)
                gs = ops._spread_noise_grad_sigma_kernel(gy, sig, kind, seed, offset)
                close(gs, (gy.double() * e).sum(0, keepdim=True), 1e-4, 1e-4, f"spread_noise grad_sigma kind={kind} {dt}")
            # half precision I/O, float32 sigma
            for dt in (torch.float16, torch.bfloat16):
                y = ops._spread_noise_kernel(torch.zeros(1000, dtype=dt), torch.ones(1), kind, seed, offset)
                tol = 2.0 ** -10 if dt == torch.float16 else 2.0 ** -7  # one ulp of the I/O type
                close(y, torch.from_numpy(stream_noise_reference(1000, kind, seed, offset)), tol, tol,
                      f"spread_noise eps kind={kind} {dt}")
        # public op: law of the noise on 2^16 draws, reproducible from the generator state
        with use_backend("cpu", "spread_noise"):
            a = fastgen.spread_noise(torch.zeros(1 << 16), 1.0, generator=torch.Generator().manual_seed(3))
            b = fastgen.spread_noise(torch.zeros(1 << 16), 1.0, generator=torch.Generator().manual_seed(3))
        if not torch.equal(a, b):
            raise AssertionError("spread_noise not reproducible for one generator state")
        if abs(float(a.mean())) > 0.02 or abs(float(a.var()) - 1) > 0.03:
            raise AssertionError(f"spread_noise law: mean {float(a.mean()):.4f} var {float(a.var()):.4f}")

    @check("spread_log_likelihood kernels: gaussian / laplace, scalar and per-dim sigma; values and grads")
    def _():
        g = torch.Generator().manual_seed(4)
        for dt, tol in ((torch.float32, 2e-4), (torch.float64, 1e-9)):
            for kind in ("gaussian", "laplace"):
                for (N, S, D) in ((37, 53, 13), (5, 16, 3), (9, 100, 40)):
                    for per_dim in (False, True):
                        y = (torch.randn(N, D, generator=g, dtype=torch.float64) + 50).to(dt).requires_grad_()
                        x = (torch.randn(S, D, generator=g, dtype=torch.float64) + 50).to(dt).requires_grad_()
                        s = ((torch.rand(D, generator=g, dtype=dt) + 0.5) if per_dim
                             else torch.tensor(0.8, dtype=dt)).requires_grad_()
                        with use_backend("cpu", "spread_log_likelihood"):
                            out = fastgen.spread_log_likelihood(y, x, s, kind=kind)
                        yr, xr, sr = (a.detach().double().requires_grad_() for a in (y, x, s))
                        ref = sll_ref(yr, xr, sr, kind)
                        what = f"sll {dt} {kind} {(N, S, D)} per_dim={per_dim}"
                        close(out, ref, tol, tol * D, what)
                        w = torch.randn(N, generator=g, dtype=torch.float64)
                        (out.double() * w).sum().backward()
                        (ref * w).sum().backward()
                        for a, r, n in ((y, yr, "y"), (x, xr, "samples"), (s, sr, "sigma")):
                            close(a.grad, r.grad, 10 * tol, 10 * tol * max(N, S), f"{what} grad {n}")

    n_ok = sum(ok for _, ok, _ in RESULTS)
    n_bad = len(RESULTS) - n_ok
    print(f"wheel_smoke: {n_ok} passed, {n_bad} failed (torch {torch.__version__}, python "
          f"{platform.python_version()})", flush=True)
    return 0 if n_bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
