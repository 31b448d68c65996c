"""fastgen.spread_noise on every backend available here (Triton in the interpreter on CPU):
the law of the noise (Kolmogorov-Smirnov against N(0, 1) and Laplace(0, 1), mean, variance,
tails), y = x + sigma * eps against the reference with the backend's own noise, gradients w.r.t.
x and sigma against autograd of the reference, every sigma broadcast, reproducibility, dtypes,
int64 counters, errors."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

import fastgen
from fastgen._dispatch import use_backend
from fastgen.reference.spread_noise import spread_noise_reference, unit_cdf, unit_variance

from conftest import GRAD_FLAGS, backends_for, has_ext_kernel, has_triton

BACKENDS = backends_for("spread_noise")
KINDS = ("gaussian", "laplace")


def _n(backend, big, small):
    return small if backend == "triton" and not torch.cuda.is_available() else big


def _noise(backend, shape, kind, seed, **kw):
    """The backend's eps for generator seed `seed` (x = 0, sigma = 1 gives y = eps exactly)."""
    g = torch.Generator().manual_seed(seed)
    with use_backend(backend, "spread_noise"):
        return fastgen.spread_noise(torch.zeros(shape, **kw), 1.0, kind=kind, generator=g)


def _run(backend, x, sigma, kind, seed):
    g = torch.Generator().manual_seed(seed)
    with use_backend(backend, "spread_noise"):
        return fastgen.spread_noise(x, sigma, kind=kind, generator=g)


# ------------------------------------------------------------------------------------------ law
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_law_ks_mean_var(backend, kind):
    n = _n(backend, 1 << 18, 1 << 15)
    e = _noise(backend, (n,), kind, seed=1234).double().numpy()
    # Kolmogorov-Smirnov against the exact unit law (fixed seed: deterministic, not flaky)
    p = stats.kstest(e, unit_cdf(kind)).pvalue
    assert p > 1e-3, f"KS p-value {p:.2e}"
    # mean 0 and variance (1 or 2) within 5 standard errors
    var = unit_variance(kind)
    kurt4 = 3.0 if kind == "gaussian" else 24.0 / 4.0  # E eps^4 / var^2
    assert abs(e.mean()) < 5 * math.sqrt(var / n)
    assert abs(e.var() - var) < 5 * var * math.sqrt((kurt4 - 1) / n)
    # symmetric, no exact zeros piling up, no NaN / inf
    assert np.isfinite(e).all()
    assert abs((e > 0).mean() - 0.5) < 5 * 0.5 / math.sqrt(n)


@pytest.mark.skipif(not has_ext_kernel("spread_noise"), reason="fastgen._C not built")
@pytest.mark.parametrize("kind", KINDS)
def test_tails_cpu(kind):
    # 4M draws: the tail mass beyond t matches the law (Poisson count within 5 sd) out to
    # |eps| = 4.5 (Gaussian, 6.8e-6) / 12 (Laplace, 6.1e-6); tl.randn would cap |eps| at 5.68.
    n = 1 << 22
    e = _noise("cpu", (n,), kind, seed=99).double()
    ts = (3.0, 4.0, 4.5) if kind == "gaussian" else (6.0, 9.0, 12.0)
    for t in ts:
        pt = math.erfc(t / math.sqrt(2)) if kind == "gaussian" else math.exp(-t)
        cnt = int((e.abs() > t).sum())
        lam = n * pt
        assert abs(cnt - lam) < 5 * math.sqrt(lam) + 2, (t, cnt, lam)
    assert e.abs().max() > (4.8 if kind == "gaussian" else 14.0)
    assert e.abs().max() < (6.77 if kind == "gaussian" else 22.0)  # sqrt(66 ln 2); 32 ln 2


@pytest.mark.skipif(not (has_ext_kernel("spread_noise") and has_triton()), reason="needs fastgen._C and triton")
@pytest.mark.parametrize("kind", KINDS)
def test_cpu_and_triton_share_the_stream(kind):
    # same Philox counters and the same maps: equal to float rounding of log / sin / cos
    shape = (3, 1000)
    a = _noise("cpu", shape, kind, seed=5)
    b = _noise("triton", shape, kind, seed=5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not (has_ext_kernel("spread_noise") and has_triton()), reason="needs fastgen._C and triton")
def test_int64_counters_cpu_triton():
    # counters beyond 2^32 (offset of a CUDA generator, or > 2^34 elements) use both counter words
    from fastgen.ops import spread_noise as sn

    x = torch.zeros(700)
    off = (1 << 40) + 12345
    a = sn._CppImpl.forward(x, None, 1.0, 0, 777, off)
    b = sn._TritonImpl.forward(x, None, 1.0, 0, 777, off)
    c = sn._CppImpl.forward(x, None, 1.0, 0, 777, off + 64)  # next chunk of counters
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[256:], c[:-256], rtol=0, atol=0)  # counter + 64 = element + 256
    assert not torch.equal(a, sn._CppImpl.forward(x, None, 1.0, 0, 777, off & 0xFFFFFFFF))


# ------------------------------------------------------------------- values and gradients
# (x shape, sigma shape): scalar tensor, one element, per-dimension [D], per-channel [C, 1, 1],
# full shape, a leading-dims spread, and two alternating broadcast groups
SIGMA_CASES = [
    ((6, 70), ()),
    ((6, 70), (1,)),
    ((6, 70), (70,)),
    ((6, 70), (6, 1)),
    ((6, 70), (6, 70)),
    ((4, 3, 5, 7), (3, 1, 1)),
    ((4, 3, 5, 7), (3, 1, 7)),
    ((300,), (300,)),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("xs,ss", SIGMA_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_grads_vs_reference(backend, xs, ss, kind):
    eps = _noise(backend, xs, kind, seed=42).double()
    x = (torch.randn(xs, dtype=torch.float64) * 3 + 100).float().requires_grad_()
    sigma = (torch.rand(ss, dtype=torch.float64) + 0.2).float().requires_grad_()
    y = _run(backend, x, sigma, kind, seed=42)
    x64 = x.detach().double().requires_grad_()
    s64 = sigma.detach().double().requires_grad_()
    want = spread_noise_reference(x64, s64, eps)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=2e-5)
    gy = torch.randn(xs, dtype=torch.float64)
    y.backward(gy.float())
    want.backward(gy)
    assert torch.equal(x.grad, gy.float())
    assert sigma.grad.shape == sigma.shape
    torch.testing.assert_close(sigma.grad.double(), s64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_sigma_and_zero_sigma(backend):
    x = torch.randn(5, 33)
    eps = _noise(backend, x.shape, "gaussian", seed=3)
    torch.testing.assert_close(_run(backend, x, 0.25, "gaussian", 3), x + 0.25 * eps, rtol=1e-6, atol=1e-6)
    assert torch.equal(_run(backend, x, 0.0, "laplace", 3), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_sigma_only_and_x_only(backend):
    x = torch.randn(4, 40)
    s = torch.full((40,), 0.5, requires_grad=True)
    _run(backend, x, s, "laplace", 8).sum().backward()
    eps = _noise(backend, x.shape, "laplace", seed=8)
    torch.testing.assert_close(s.grad, eps.sum(0), rtol=1e-5, atol=1e-5)
    xr = torch.randn(4, 40, requires_grad=True)
    (_run(backend, xr, 0.3, "gaussian", 8) * 2).sum().backward()
    assert torch.equal(xr.grad, torch.full_like(xr, 2.0))


# -------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_from_generator(backend):
    x = torch.randn(3, 257)
    a = _run(backend, x, 0.5, "gaussian", 11)
    b = _run(backend, x, 0.5, "gaussian", 11)
    c = _run(backend, x, 0.5, "gaussian", 12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a generator advances: two calls on one generator differ, and replay from its state
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    with use_backend(backend, "spread_noise"):
        y1 = fastgen.spread_noise(x, 0.5, generator=g)
        y2 = fastgen.spread_noise(x, 0.5, generator=g)
        g.set_state(state)
        y3 = fastgen.spread_noise(x, 0.5, generator=g)
        # default generator: torch.manual_seed
        torch.manual_seed(7)
        d1 = fastgen.spread_noise(x, 0.5)
        torch.manual_seed(7)
        d2 = fastgen.spread_noise(x, 0.5)
    assert not torch.equal(y1, y2) and torch.equal(y1, y3) and torch.equal(d1, d2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_regenerates_the_same_noise(backend):
    # the noise is not stored: grad_sigma of a scalar sigma is sum(eps * g) with the forward's eps
    x = torch.zeros(2, 500)
    s = torch.tensor(1.0, requires_grad=True)
    y = _run(backend, x, s, "gaussian", 21)
    y.backward(y.detach())  # grad_sigma = sum(eps * eps) with eps = y
    torch.testing.assert_close(s.grad, (y.detach().double() ** 2).sum().float(), rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------------- dtypes, layouts
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend, dtype):
    x = (torch.randn(3, 100) * 2).to(dtype)
    eps = _noise(backend, x.shape, "gaussian", seed=4)
    s = torch.rand(100, dtype=dtype) + 0.1
    y = _run(backend, x, s, "gaussian", 4)
    assert y.dtype == dtype
    want = (x.double() + s.double() * eps.double()).to(dtype)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(y.double(), want.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty(backend):
    base = torch.randn(50, 30)
    xt = base.t()
    y1 = _run(backend, xt, 0.7, "laplace", 6)
    y2 = _run(backend, xt.contiguous(), 0.7, "laplace", 6)
    assert torch.equal(y1, y2) and y1.shape == xt.shape
    e = _run(backend, torch.empty(0, 4), 1.0, "gaussian", 6)
    assert e.shape == (0, 4)
    z = _run(backend, torch.tensor(2.0), 1.0, "gaussian", 6)  # 0-d
    assert z.shape == () and torch.isfinite(z)


# --------------------------------------------------------------------------------- errors
def test_errors():
    x = torch.randn(4, 5)
    with pytest.raises(ValueError, match="sigma"):
        fastgen.spread_noise(x, -0.1)
    with pytest.raises(ValueError, match="sigma"):
        fastgen.spread_noise(x, float("nan"))
    with pytest.raises(ValueError, match="sigma"):
        fastgen.spread_noise(x, torch.tensor([0.5, -1.0, 0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="sigma"):
        fastgen.spread_noise(x, torch.ones(4))  # not broadcastable to [4, 5]
    with pytest.raises(ValueError, match="sigma"):
        fastgen.spread_noise(x, torch.ones(2, 4, 5))  # would enlarge x
    with pytest.raises(ValueError, match="uniform"):
        fastgen.spread_noise(x, 1.0, kind="uniform")
    with pytest.raises(ValueError, match="kind"):
        fastgen.spread_noise(x, 1.0, kind="cauchy")
    with pytest.raises(TypeError, match="kind"):
        fastgen.spread_noise(x, 1.0, kind=None)
    with pytest.raises(TypeError, match="x"):
        fastgen.spread_noise(torch.ones(4, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError, match="x"):
        fastgen.spread_noise([1.0, 2.0], 1.0)
    with pytest.raises(TypeError, match="sigma"):
        fastgen.spread_noise(x, torch.ones(5, dtype=torch.int32))
    with pytest.raises(TypeError, match="sigma"):
        fastgen.spread_noise(x, "1")
    with pytest.raises(TypeError, match="generator"):
        fastgen.spread_noise(x, 1.0, generator=3)


# ------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_ks_1e7(kind):
    g = torch.Generator().manual_seed(2024)
    n = 10_000_000
    with use_backend("triton", "spread_noise"):
        e = fastgen.spread_noise(torch.zeros(n, device="cuda"), 1.0, kind=kind, generator=g)
    e = e.double().cpu().numpy()
    assert stats.kstest(e, unit_cdf(kind)).pvalue > 1e-3
    # tails: tl.randn would put no mass beyond 5.68 and a spike at its clamp
    t = 4.5 if kind == "gaussian" else 12.0
    pt = math.erfc(t / math.sqrt(2)) if kind == "gaussian" else math.exp(-t)
    lam = n * pt
    assert abs(int((np.abs(e) > t).sum()) - lam) < 5 * math.sqrt(lam) + 2


@pytest.mark.gpu
def test_gpu_matches_cpu_and_large():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1 << 20)
    with use_backend("triton", "spread_noise"):
        yg = fastgen.spread_noise(x.cuda(), 0.5, generator=g).cpu()
    if has_ext_kernel("spread_noise"):
        yc = _run("cpu", x, 0.5, "gaussian", 3)
        torch.testing.assert_close(yg, yc, rtol=1e-5, atol=1e-5)
    # more than 2^31 elements: int64 offsets (y - x / sigma is the noise; spot-check the tail)
    n = (1 << 31) + 4096
    xb = torch.zeros(n, device="cuda", dtype=torch.float16)
    with use_backend("triton", "spread_noise"):
        yb = fastgen.spread_noise(xb, 1.0, generator=torch.Generator().manual_seed(1))
    tail = yb[-(1 << 20):].float()
    assert torch.isfinite(tail).all() and abs(float(tail.std()) - 1.0) < 0.01
    assert not torch.equal(yb[:1 << 20], yb[-(1 << 20):])
    del xb, yb
    for dt in (torch.float16, torch.bfloat16):
        s = torch.rand(512, device="cuda", dtype=dt, requires_grad=True)
        xx = torch.randn(4096, 512, device="cuda", dtype=dt)
        with use_backend("triton", "spread_noise"):
            y = fastgen.spread_noise(xx, s, generator=torch.Generator().manual_seed(0))
        y.float().sum().backward()
        assert y.dtype == dt and s.grad.shape == s.shape and torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------------ torch.func
# float64, small shapes. A fresh generator with a fixed seed inside the function under test: every
# call (gradcheck's perturbed evaluations included) draws the same noise.
F64 = torch.float64
FUNC_SIGMAS = [(), (4,), (3, 1)]  # scalar tensor, per-dimension, per-row


def _fixed(backend, kind, seed=3):
    def f(x, s):
        with use_backend(backend, "spread_noise"):
            return fastgen.spread_noise(x, s, kind=kind, generator=torch.Generator().manual_seed(seed))
    return f


def _func_inputs(ss):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, dtype=F64, generator=g)
    s = torch.rand(ss, dtype=F64, generator=g) + 0.5
    return x, s


def _func_backends():
    # the interpreter runs every launch in Python: Triton on one sigma shape only (below)
    return ["torch", pytest.param("cpu", marks=pytest.mark.skipif(not has_ext_kernel("spread_noise"),
                                                                    reason="fastgen._C not built"))]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("ss", FUNC_SIGMAS)
@pytest.mark.parametrize("backend", _func_backends())
def test_gradcheck_gradgradcheck(backend, ss, kind):
    f = _fixed(backend, kind)
    x, s = (a.requires_grad_() for a in _func_inputs(ss))
    assert torch.autograd.gradcheck(f, (x, s), **GRAD_FLAGS)
    # the backward is linear in grad_y; through a nonlinear loss the second derivative is not zero
    assert torch.autograd.gradgradcheck(f, (x, s), check_fwd_over_rev=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, s: f(x, s).sin(), (x, s), check_fwd_over_rev=True,
                                        check_batched_grad=True)


@pytest.mark.skipif(not has_triton(), reason="triton not installed")
def test_gradcheck_triton():
    # the interpreter runs every launch in Python: one small case, first order (the second-order
    # formulas are the backend-independent torch ops exercised above)
    f = _fixed("triton", "laplace")
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    s = (torch.rand(3, dtype=F64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(f, (x, s), **GRAD_FLAGS, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_not_zero(backend):
    # L = sum(y^2), y = x + s eps: d2L/ds2 = 2 sum(eps^2), d2L/dx ds = 2 eps (summed over rows)
    f = _fixed(backend, "laplace")
    x, s = _func_inputs((4,))
    x.requires_grad_(), s.requires_grad_()
    eps = (f(x, s) - x).detach() / s.detach()
    (gs,) = torch.autograd.grad((f(x, s) ** 2).sum(), s, create_graph=True)
    hss, hsx = torch.autograd.grad(gs.sum(), [s, x])
    torch.testing.assert_close(hss, 2 * (eps * eps).sum(0))
    torch.testing.assert_close(hsx, 2 * eps)
    assert hss.abs().min() > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_jacobians_hessian_vs_reference(backend, kind):
    f = _fixed(backend, kind)
    x, s = _func_inputs((4,))
    eps = ((f(x, s) - x) / s).detach()  # the backend's noise for this seed

    def ref(x, s):
        return spread_noise_reference(x, s, eps)

    tx, ts = torch.randn_like(x), torch.randn_like(s)
    yf, jf = torch.func.jvp(f, (x, s), (tx, ts))
    yr, jr = torch.func.jvp(ref, (x, s), (tx, ts))
    torch.testing.assert_close(yf, yr)
    torch.testing.assert_close(jf, jr)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        for a, b in zip(jac(f, argnums=(0, 1))(x, s), jac(ref, argnums=(0, 1))(x, s)):
            torch.testing.assert_close(a, b)

    def loss(fn):
        return lambda x, s: (fn(x, s).sin() * torch.arange(12.0, dtype=F64).reshape(3, 4)).sum()

    hf = torch.func.hessian(loss(f), argnums=(0, 1))(x, s)
    hr = torch.func.hessian(loss(ref), argnums=(0, 1))(x, s)
    for rf, rr in zip(hf, hr):
        for a, b in zip(rf, rr):
            torch.testing.assert_close(a, b)


def _count_launches(monkeypatch, backend):
    from fastgen.ops import spread_noise as sn

    impl = {"torch": sn._TorchImpl, "cpu": sn._CppImpl, "triton": getattr(sn, "_TritonImpl", None)}[backend]
    calls = []
    orig = impl.forward

    def counted(*a):
        calls.append(a[0].shape)
        return orig(*a)

    monkeypatch.setattr(impl, "forward", counted)
    return calls


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_randomness(backend, kind, monkeypatch):
    f = _fixed(backend, kind)
    B = 5
    g = torch.Generator().manual_seed(2)
    xb = torch.randn(B, 3, 4, dtype=F64, generator=g)
    sb = torch.rand(B, 4, dtype=F64, generator=g) + 0.5
    s = sb[0]
    # "error" (vmap's default): torch's own error for a random op under vmap
    with pytest.raises(RuntimeError, match="randomness error mode"):
        torch.func.vmap(f, in_dims=(0, None))(xb, s)
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(f, in_dims=(0, None), randomness="error")(xb, s)
    calls = _count_launches(monkeypatch, backend)
    # "different": independent noise per element, one launch on the batched tensor: element b holds
    # the noise of a single call on the [B, 3, 4] batch (x + sigma * eps with that eps)
    yd = torch.func.vmap(f, in_dims=(0, None), randomness="different")(xb, s)
    assert calls == [(B, 3, 4)]
    ed = (yd - xb) / s
    torch.testing.assert_close(yd, f(xb, s))
    assert all(not torch.allclose(ed[i], ed[j]) for i in range(B) for j in range(i))
    # "same": one draw shared by the batch (one launch of one element's shape), equal to a loop
    calls.clear()
    ys = torch.func.vmap(f, in_dims=(0, None), randomness="same")(xb, s)
    assert calls == [(3, 4)]
    es = (ys - xb) / s
    assert all(torch.allclose(es[0], es[i]) for i in range(B))
    torch.testing.assert_close(ys, torch.stack([f(xb[i], s) for i in range(B)]))
    # batched sigma (x batched or not), batch dim not first
    xt = xb.movedim(0, 2)  # [3, 4, B]
    for r in ("same", "different"):
        y1 = torch.func.vmap(f, in_dims=(2, 0), randomness=r)(xt, sb)
        y2 = torch.func.vmap(f, in_dims=(None, 0), randomness=r)(xb[0], sb)
        e1, e2 = (y1 - xb) / sb[:, None, :], (y2 - xb[0]) / sb[:, None, :]
        if r == "same":
            torch.testing.assert_close(y1, torch.stack([f(xb[i], sb[i]) for i in range(B)]))
            torch.testing.assert_close(e2, e1)
        else:
            torch.testing.assert_close(e1, ed)  # the same batched stream, whichever input is batched
            torch.testing.assert_close(e2, ed)
    # float sigma
    yf = torch.func.vmap(lambda x: f(x, 0.5), randomness="different")(xb)
    torch.testing.assert_close((yf - xb) / 0.5, ed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients(backend, kind):
    """vmap(grad(f)): per-example gradients w.r.t. x and a shared sigma, against a Python loop
    (the backward regenerates each element's noise as the forward drew it)."""
    f = _fixed(backend, kind)
    B = 4
    g = torch.Generator().manual_seed(5)
    xb = torch.randn(B, 3, 4, dtype=F64, generator=g)
    t = torch.randn(B, 3, 4, dtype=F64, generator=g)
    s = torch.rand(4, dtype=F64, generator=g) + 0.5

    def loss(x, s, t):
        return ((f(x, s) - t) ** 2).sum()

    for r in ("same", "different"):
        gx, gs = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, None, 0), randomness=r)(xb, s, t)
        eps = (torch.func.vmap(f, in_dims=(0, None), randomness=r)(xb, s) - xb) / s
        for i in range(B):
            xi, si = xb[i].clone().requires_grad_(), s.clone().requires_grad_()
            li = ((spread_noise_reference(xi, si, eps[i]) - t[i]) ** 2).sum()
            wx, ws = torch.autograd.grad(li, [xi, si])
            torch.testing.assert_close(gx[i], wx)
            torch.testing.assert_close(gs[i], ws)
        if r == "same":  # the loop that calls the op itself with the same generator state
            for i in range(B):
                xi, si = xb[i].clone().requires_grad_(), s.clone().requires_grad_()
                wx, ws = torch.autograd.grad(loss(xi, si, t[i]), [xi, si])
                # (the eager loop runs the fused grad_sigma: float32 sums on triton)
                torch.testing.assert_close(gs[i], ws, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_with_backward(backend):
    """torch.compile(fullgraph=True): forward and backward through fastgen::spread_noise (Laplace,
    per-dimension sigma); the backward regenerates the graph's noise (grad_sigma = sum(eps * w))."""
    torch._dynamo.reset()

    def f(x, s):
        return fastgen.spread_noise(x, s, kind="laplace")

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(6, 5, requires_grad=True)
    s = (torch.rand(5) + 0.5).requires_grad_()
    w = torch.randn(6, 5)
    with use_backend(backend, "spread_noise"):
        y = cf(x, s)
        gx, gs = torch.autograd.grad(y, [x, s], w)
    eps = (y.detach() - x.detach()) / s.detach()
    assert torch.isfinite(eps).all() and eps.std() > 0.5
    assert torch.equal(gx, w)
    torch.testing.assert_close(gs, (eps * w).sum(0), rtol=1e-4, atol=1e-4)


def test_forward_over_forward_raises():
    # jacfwd(jacfwd(f)) would miss the derivative of the jvp formula: an error, not a wrong answer;
    # forward-over-reverse (torch.func.hessian) is the supported second order
    f = _fixed("torch", "gaussian")
    x, s = _func_inputs((4,))
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        torch.func.jacfwd(torch.func.jacfwd(lambda s: (f(x, s) ** 3).sum()))(s)
    g = lambda s: (f(x, s) ** 3).sum()  # noqa: E731
    torch.testing.assert_close(torch.func.jacfwd(torch.func.jacrev(g))(s), torch.func.jacrev(torch.func.jacrev(g))(s))


@pytest.mark.skipif(not has_ext_kernel("spread_noise"), reason="fastgen._C not built")
def test_cpu_large_output_starts_on_a_huge_page_boundary():
    # >= 8 MiB outputs are 2 MiB-aligned contiguous views (csrc/cpu/boundary.h empty_huge): the
    # same noise as a small call's prefix stream, in the input's shape
    x = torch.randn(3, 1024, 1023)  # 12 MiB, odd last dim
    y = _run("cpu", x, 0.5, "gaussian", 11)
    assert y.shape == x.shape and y.is_contiguous() and y.data_ptr() % (2 << 20) == 0
    eps = _noise("cpu", x.shape, "gaussian", seed=11)
    assert eps.data_ptr() % (2 << 20) == 0
    torch.testing.assert_close(y, x + 0.5 * eps, rtol=1e-6, atol=1e-6)
    e = eps.double()
    assert abs(e.mean().item()) < 5e-3 and abs(e.std().item() - 1) < 5e-3


@pytest.mark.skipif(not has_ext_kernel("spread_noise"), reason="fastgen._C not built")
def test_cpu_kernel_rejects_sigma_that_does_not_broadcast():
    # the C++ op reads sigma through broadcast strides: a direct call with a wrong shape must
    # raise, not read (or, for the gradient, write) outside sigma's buffer
    x = torch.zeros(5, 4)
    for bad in (torch.ones(3, 4), torch.ones(5, 3)):
        with pytest.raises(RuntimeError, match="does not broadcast"):
            torch.ops.fastgen._spread_noise_kernel(x, bad, 0, 1, 0)
        with pytest.raises(RuntimeError, match="does not broadcast"):
            torch.ops.fastgen._spread_noise_grad_sigma_kernel(x, bad, 0, 1, 0)
    assert torch.ops.fastgen._spread_noise_kernel(x, torch.ones(5, 1), 0, 1, 0).shape == x.shape
