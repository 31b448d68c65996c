"""Compact correctness check of every CPU kernel of fastgen._C on ONE CPU path, against the
plain-torch / numpy references, on hard inputs; plus the max ulp error of the kernels' vector math
over a dense sweep of its domain. Run in a fresh process per path (the path is chosen once, when
fastgen._C loads):

    FASTGEN_CPU_ISA=avx2 python tests/isa_check.py [--json]

Used by tests/test_cpu_isa.py (one subprocess per path the machine runs) and by the emulation
checks (qemu-x86_64 -cpu Nehalem / Haswell). Calls the internal kernel ops directly
(torch.ops.fastgen._<op>_kernel: their schemas are the C++ boundary), so that it tests the compiled
code of the path and nothing above it. Prints one line per check; exit status 1 on any failure.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fastgen import _backend  # noqa: E402
from fastgen.reference.gaussian_nll import nll_formula  # noqa: E402
from fastgen.reference.knn import knn as knn_ref, neighbour_dist2  # noqa: E402
from fastgen.reference.spread_log_likelihood import spread_log_likelihood_reference as sll_ref  # noqa: E402
from fastgen.reference.spread_noise import stream_noise_reference  # noqa: E402

# Max ulp error of the vector math (kernels.h fn codes), the bound each path must meet.
# (measured max on the AVX-512 Zen 5 build: see the comment in csrc/cpu/vmath.h)
ULP_BOUND = {"exp": 1.1, "log": 1.0, "exp_neg": 1.1, "log01": 1.0}
SINCOS_ABS_BOUND = 1.5e-7   # sin / cos(2 pi b 2^-32): absolute error (values in [-1, 1])

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, bool(ok), detail))


def ops():
    if _backend.load_ext() is None:
        raise SystemExit(f"fastgen._C not loaded: {_backend.ext_error()}")
    return torch.ops.fastgen


# ---------------------------------------------------------------------------------------- knn
def check_knn(F) -> None:
    g = torch.Generator().manual_seed(1)
    cases = []
    # tight clusters far from the origin (cancellation of the ||q||^2 - 2 q.k + ||k||^2 expansion)
    centres = torch.randn(4, 64, generator=g, dtype=torch.float64) * 10 + 1000
    key = (centres[torch.randint(0, 4, (900,), generator=g)]
           + 1e-2 * torch.randn(900, 64, generator=g, dtype=torch.float64))
    q = (centres[torch.randint(0, 4, (150,), generator=g)]
         + 1e-2 * torch.randn(150, 64, generator=g, dtype=torch.float64))
    cases.append(("clustered-1e3-D64", q.float(), key.float(), 5))
    # exact ties (duplicate keys: the lowest index wins), small integers
    kt = torch.randint(-3, 4, (300, 7), generator=g).float()
    kt = torch.cat([kt, kt[:100]])
    cases.append(("ties-D7", torch.randint(-3, 4, (70, 7), generator=g).float(), kt, 9))
    # C > 32 (sorted lists) and C > 64 (heaps), odd D, fp64 / fp16 / bf16
    cases.append(("k40-D130", torch.randn(40, 130, generator=g), torch.randn(700, 130, generator=g), 40))
    cases.append(("k70-D33", torch.randn(30, 33, generator=g), torch.randn(500, 33, generator=g), 70))
    cases.append(("f64-D64", torch.randn(60, 64, generator=g, dtype=torch.float64),
                  torch.randn(500, 64, generator=g, dtype=torch.float64), 3))
    cases.append(("f16-D24", torch.randn(50, 24, generator=g).half(), torch.randn(400, 24, generator=g).half(), 4))
    cases.append(("bf16-D24", torch.randn(50, 24, generator=g).bfloat16(),
                  torch.randn(400, 24, generator=g).bfloat16(), 4))
    # enough work for two threads and the fallback machinery (N * M * D >= 2^26)
    cases.append(("big-D64", torch.randn(1100, 64, generator=g), torch.randn(1000, 64, generator=g), 10))
    for name, qq, kk, k in cases:
        d, i = F._knn_kernel(qq[None], kk[None], k)
        rd, ri = knn_ref(qq, kk, k)
        same = torch.equal(i[0], ri)
        if not same:  # another index is right only at exactly the reference's distance (a tie)
            same = bool((neighbour_dist2(qq.double(), kk.double(), i[0]) == rd).all())
        derr = ((d[0].double() - rd).abs() / rd.abs().clamp_min(1e-30)).max().item()
        check(f"knn {name}", same and derr <= (1e-15 if qq.dtype == torch.float64 else 2 ** -23),
              f"indices {'equal' if same else 'DIFFER'}, max rel. dist error {derr:.2e}")
    bad = torch.randn(20, 8)
    bad[3, 2] = float("nan")
    try:
        F._knn_kernel(bad[None], torch.randn(1, 50, 8), 2)
        check("knn nan query -> error", False, "no error")
    except (ValueError, RuntimeError) as e:
        check("knn nan query -> error", "NaN" in str(e), str(e)[:80])


# ------------------------------------------------------------------------------- gaussian_nll
def check_gaussian_nll(F) -> None:
    g = torch.Generator().manual_seed(2)
    shapes = [  # (A, B, C): per-element var, var broadcast over B (C = 1 and general)
        (1, 1, 5003), (3, 700, 1), (4, 3, 300), (2, 40, 257)]
    for (A, B, C) in shapes:
        for dt in (torch.float32, torch.float64, torch.bfloat16):
            for log_var, beta, full, red in ((False, 0.0, False, 1), (True, 0.0, True, 2), (False, 0.5, False, 1),
                                             (False, 0.0, True, 0)):
                x = torch.randn(A, B, C, generator=g, dtype=torch.float64) * 3
                t = torch.randn(A, B, C, generator=g, dtype=torch.float64)
                if log_var:
                    v = torch.randn(A, 1, C, generator=g, dtype=torch.float64) * 4
                else:  # spans the eps clamp, tiny, huge
                    v = torch.exp(torch.randn(A, 1, C, generator=g, dtype=torch.float64) * 6)
                    v.view(-1)[::7] = 1e-9
                x, t, v = x.to(dt), t.to(dt), v.to(dt)
                res = F._gaussian_nll_kernel(x.reshape(-1), t.reshape(-1), v.reshape(-1), A, B, C, full, 1e-6,
                                             log_var, beta, red, True, True, True)
                xr = x.double().requires_grad_(red != 0)
                tr = t.double().requires_grad_(red != 0)
                vr = v.double().requires_grad_(red != 0)
                rloss = nll_formula(xr, tr, vr, full, 1e-6, ("none", "mean", "sum")[red], log_var, beta).reshape(-1)
                tol = {torch.float32: 3e-5, torch.float64: 1e-11, torch.bfloat16: 2e-2}[dt]
                loss = res[0].double()
                err = ((loss - rloss.detach()).abs() / rloss.detach().abs().clamp_min(1)).max().item()
                ok = err <= tol
                detail = f"loss rel. err {err:.1e}"
                if red != 0:
                    gx, gt, gv = torch.autograd.grad(rloss, (xr, tr, vr))
                    for name, got, ref in (("gin", res[1], gx), ("gt", res[2], gt), ("gvar", res[3], gv)):
                        ref = ref.reshape(-1)
                        e = ((got.double() - ref).abs() / ref.abs().clamp_min(ref.abs().max() * 1e-3 + 1e-30)).max().item()
                        ok &= e <= 10 * tol
                        detail += f", {name} {e:.1e}"
                check(f"gaussian_nll {A}x{B}x{C} {str(dt)[6:]} logvar={log_var} beta={beta} red={red}", ok, detail)
    # backward of reduction "none", per-element grad_output
    x, t = torch.randn(3, 50, 70, generator=g), torch.randn(3, 50, 70, generator=g)
    v = torch.rand(3, 1, 70, generator=g) + 0.1
    go = torch.randn(3, 50, 70, generator=g)
    gi, gt, gv = F._gaussian_nll_backward_kernel(go.reshape(-1), x.reshape(-1), t.reshape(-1), v.reshape(-1), 3, 50,
                                                 70, False, 1e-6, False, 0.0, True, True, True)
    xr, tr, vr = (a.double().requires_grad_() for a in (x, t, v))
    rl = nll_formula(xr, tr, vr, False, 1e-6, "none", False, 0.0).reshape(-1)
    rx, rt, rv = torch.autograd.grad(rl, (xr, tr, vr), go.double().reshape(-1))
    e = max(((a.double() - b.reshape(-1)).abs().max() / b.abs().max()).item() for a, b in ((gi, rx), (gt, rt), (gv, rv)))
    check("gaussian_nll backward none", e < 1e-5, f"max rel. err {e:.1e}")
    # negative var flag
    res = F._gaussian_nll_kernel(x.reshape(-1), t.reshape(-1), -v.reshape(-1), 3, 50, 70, False, 1e-6, False, 0.0, 1,
                                 False, False, False)
    check("gaussian_nll negative var flag", int(res[4]) == 1)


# ------------------------------------------------------------------------------- spread_noise
def check_spread_noise(F) -> None:
    for kind in (0, 1):
        for numel, seed, offset in ((5000, 123456789, 0), (777, 2 ** 40 + 5, 2 ** 33 - 3)):
            y = F._spread_noise_kernel(torch.zeros(numel), torch.tensor(1.0), kind, seed, offset)
            ref = stream_noise_reference(numel, kind, seed, offset)
            err = np.abs(y.double().numpy() - ref) / np.maximum(1.0, np.abs(ref))
            check(f"spread_noise kind={kind} n={numel} offset={offset}", err.max() < 2e-6,
                  f"max err {err.max():.1e}")
        # broadcast sigma [4, 1, 6] over x [4, 5, 6], float64 and bfloat16, and its gradient
        numel, seed = 120, 99
        ref = torch.from_numpy(stream_noise_reference(numel, kind, seed, 7)).reshape(4, 5, 6)
        x = torch.randn(4, 5, 6, dtype=torch.float64)
        s = torch.rand(4, 1, 6, dtype=torch.float64) + 0.5
        y = F._spread_noise_kernel(x, s, kind, seed, 7)
        e = ((y - (x + s * ref)).abs().max()).item()
        gy = torch.randn(4, 5, 6, dtype=torch.float64)
        gs = F._spread_noise_grad_sigma_kernel(gy, s, kind, seed, 7)
        eg = ((gs - (gy * ref).sum(1, keepdim=True)).abs().max()).item()
        yb = F._spread_noise_kernel(x.bfloat16(), s.float(), kind, seed, 7)
        eb = ((yb.double() - (x.bfloat16().double() + s * ref)).abs() / (1 + (x + s * ref).abs())).max().item()
        check(f"spread_noise kind={kind} broadcast sigma + grad_sigma + bf16", e < 1e-5 and eg < 1e-5 and eb < 1e-2,
              f"y {e:.1e}, grad_sigma {eg:.1e}, bf16 {eb:.1e}")


# ---------------------------------------------------------------------- spread_log_likelihood
def check_sll(F) -> None:
    g = torch.Generator().manual_seed(3)
    for kind in (0, 1):
        for perdim in (False, True):
            for dt in (torch.float32, torch.float64):
                N, S, D = 70, 300, 13
                # data offset by 1e3: direct differences, no cancellation
                y = (1000 + torch.randn(N, D, generator=g, dtype=torch.float64)).to(dt)
                x = (1000 + torch.randn(S, D, generator=g, dtype=torch.float64)).to(dt)
                sig = (torch.rand(D if perdim else 1, generator=g, dtype=torch.float64) + 0.5).to(dt)
                out = F._spread_log_likelihood_kernel(y, x, sig, kind)
                yr, xr, sr = (a.double().requires_grad_() for a in (y, x, sig))
                ref = sll_ref(yr, xr, sr if perdim else sr.reshape(()), ("gaussian", "laplace")[kind])
                tol = 1e-5 if dt == torch.float32 else 1e-11
                e = ((out.double() - ref.detach()).abs() / ref.detach().abs().clamp_min(1)).max().item()
                go = torch.randn(N, generator=g, dtype=torch.float64)
                gy, gx, gs = F._spread_log_likelihood_backward_kernel(go.to(dt), y, x, sig, out, kind, True, True,
                                                                      True)
                ry, rx, rs = torch.autograd.grad(ref, (yr, xr, sr), go)
                eg = max(((a.double() - b.reshape(a.shape)).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                         for a, b in ((gy, ry), (gx, rx), (gs, rs)))
                check(f"spread_log_likelihood kind={kind} perdim={perdim} {str(dt)[6:]}", e < tol and eg < 50 * tol,
                      f"out {e:.1e}, grads {eg:.1e}")


# ---------------------------------------------------------------------------- vector math ulp
def ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 ulp of exact (subnormal ulp 2^-149)."""
    a = np.abs(exact)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    ulp = np.exp2(np.maximum(e, -126) - 23)
    ok_inf = np.isinf(exact) & (got == exact)
    err = np.abs(got.astype(np.float64) - exact) / ulp
    return np.where(ok_inf, 0.0, err)


def vm(F, fn: int, x: np.ndarray) -> np.ndarray:
    return F._cpu_vmath_kernel(torch.from_numpy(x), fn).numpy()


def check_vmath(F) -> dict:
    out = {}

    def sweep(lo_bits, hi_bits, step):
        return np.arange(lo_bits, hi_bits, step, dtype=np.uint64).astype(np.uint32).view(np.float32)

    # exp on [-104, 88.7]: every 211th float of both signs (~33000 a binade; plus the specials)
    xs = np.concatenate([sweep(0, 0x42B17218, 211), -sweep(0, 0x42D00000, 211),
                         np.array([0, -0.0, 88.72283, 89, -87.3, -103.9, np.inf, -np.inf], np.float32)])
    got = vm(F, 0, xs)
    with np.errstate(over="ignore", invalid="ignore"):
        exact = np.exp(xs.astype(np.float64))
        exact_f = exact.astype(np.float32)  # the overflow threshold is that of float32
        err = ulp_error(got, np.where(np.isinf(exact_f), np.inf, exact))
    out["exp"] = float(err.max())
    # log on every 211th positive float (subnormals, 0 and inf included)
    xs = np.concatenate([sweep(1, 0x7F800000, 211), np.array([0, np.inf, 1, 2], np.float32)])
    got = vm(F, 1, xs)
    with np.errstate(divide="ignore", invalid="ignore"):
        exact = np.log(xs.astype(np.float64))
        out["log"] = float(ulp_error(got, exact).max())
    nan_ok = np.isnan(vm(F, 1, np.array([-1, np.nan], np.float32))).all()
    # exp on x <= 0 (spread_log_likelihood): every 127th float in [-87, 0]
    xs = -sweep(0, 0x42AE0000, 127)
    out["exp_neg"] = float(ulp_error(vm(F, 2, xs), np.exp(xs.astype(np.float64))).max())
    # log on [2^-32, 1] (spread_noise: the arguments are (m + 1/2) 2^-32 or 2^-31)
    xs = sweep(0x2F800000, 0x3F800001, 61)
    out["log01"] = float(ulp_error(vm(F, 3, xs), np.log(xs.astype(np.float64))).max())
    # sin / cos(2 pi b 2^-32): every 509th uint32 b
    b = np.arange(0, 2 ** 32, 509, dtype=np.uint64).astype(np.uint32)
    th = 2 * np.pi * b.astype(np.float64) * 2.0 ** -32
    bx = b.view(np.float32)
    out["sin_abs"] = float(np.abs(vm(F, 4, bx) - np.sin(th)).max())
    out["cos_abs"] = float(np.abs(vm(F, 5, bx) - np.cos(th)).max())
    for k, bound in ULP_BOUND.items():
        check(f"vmath {k} max ulp", out[k] <= bound, f"{out[k]:.3f} ulp (bound {bound})")
    check("vmath log(x < 0), log(nan) = nan", nan_ok)
    for k in ("sin_abs", "cos_abs"):
        check(f"vmath {k}", out[k] <= SINCOS_ABS_BOUND, f"{out[k]:.2e} (bound {SINCOS_ABS_BOUND:.1e})")
    return out


def main() -> int:
    F = ops()
    path = _backend.cpu_isa()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    check_knn(F)
    check_gaussian_nll(F)
    check_spread_noise(F)
    check_sll(F)
    ulps = check_vmath(F)
    failed = [r for r in RESULTS if not r[1]]
    if "--json" in sys.argv:
        print(json.dumps({"path": path, "available": _backend.cpu_isas_available(), "ulp": ulps,
                          "checks": RESULTS, "failed": len(failed)}))
    else:
        print(f"fastgen CPU path: {path} (this CPU runs: {', '.join(_backend.cpu_isas_available())})")
        for name, ok, detail in RESULTS:
            print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        print(f"{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed on the {path} path")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
