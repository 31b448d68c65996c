"""fastgen.spread_log_likelihood against the float64 reference (chunked logsumexp over direct
differences) on every backend available here: clustered data offset by 1e3 (where the matmul
expansion is off by ~100 nats), per-dimension and scalar sigma, both kernels, odd sizes, values
and gradients w.r.t. y, samples and sigma, float64 gradcheck, dtypes, errors."""
import math

import pytest
import torch

import fastgen
from fastgen._dispatch import use_backend
from fastgen.reference.spread_log_likelihood import spread_log_likelihood_reference as reference

from conftest import GRAD_FLAGS, backends_for, has_ext_kernel

BACKENDS = backends_for("spread_log_likelihood")
KINDS = ("gaussian", "laplace")


def _run(backend, *args, **kw):
    with use_backend(backend, "spread_log_likelihood"):
        return fastgen.spread_log_likelihood(*args, **kw)


def _offset_clustered(N, S, D, *, offset=1e3, seed=0, spread=0.5):
    """y near the samples' clusters, everything offset by 1e3 (float32 values)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, D, generator=g, dtype=torch.float64) * 2
    xs = centres[torch.randint(0, 5, (S,), generator=g)] + spread * torch.randn(S, D, generator=g, dtype=torch.float64)
    ys = centres[torch.randint(0, 5, (N,), generator=g)] + spread * torch.randn(N, D, generator=g, dtype=torch.float64)
    return (ys + offset).float(), (xs + offset).float()


def _sigma(kind_of_sigma, D):
    if kind_of_sigma == "float":
        return 0.7
    if kind_of_sigma == "scalar":
        return torch.tensor(0.6, requires_grad=True)
    return (torch.rand(D, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.4).requires_grad_()


SHAPES = [(37, 53, 13), (1, 1, 1), (5, 16, 3), (33, 17, 64), (4, 300, 2)]
# the Triton interpreter runs every program instance in Python: fewer, smaller shapes
SHAPES_INTERP = [(20, 35, 5), (1, 1, 1), (5, 16, 3), (3, 40, 2)]


def _shapes(backend):
    return SHAPES_INTERP if backend == "triton" and not torch.cuda.is_available() else SHAPES


@pytest.mark.parametrize("sig", ["float", "scalar", "perdim"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_values_and_grads_offset_data(backend, kind, sig):
    for N, S, D in _shapes(backend):
        y, x = _offset_clustered(N, S, D)
        s = _sigma(sig, D)
        yv = y.clone().requires_grad_()
        xv = x.clone().requires_grad_()
        out = _run(backend, yv, xv, s, kind=kind)
        assert out.shape == (N,) and out.dtype == torch.float32
        y64 = y.double().requires_grad_()
        x64 = x.double().requires_grad_()
        s64 = s.detach().double().requires_grad_() if isinstance(s, torch.Tensor) else s
        want = reference(y64, x64, s64, kind)
        # exact: float32 rounding of log-densities of a few nats..hundreds of nats
        torch.testing.assert_close(out.double(), want, rtol=2e-6, atol=5e-5)
        g = torch.randn(N, dtype=torch.float64)
        leaves = [yv, xv] + ([s] if isinstance(s, torch.Tensor) else [])
        leaves64 = [y64, x64] + ([s64] if isinstance(s, torch.Tensor) else [])
        got = torch.autograd.grad(out, leaves, g.float())
        exp = torch.autograd.grad(want, leaves64, g)
        for i, (a, b) in enumerate(zip(got, exp)):
            assert a.shape == b.shape
            scale = b.abs().max().clamp_min(1.0)
            if i == 2:
                # grad sigma = sum_n g_n (-D / sigma + E_w[f(d)] / sigma^k): two terms of size
                # sum|g| D / sigma that cancel; float32 weights carry ~1e-7 |log K| relative error
                scale = torch.maximum(scale, g.abs().sum() * (D if s.numel() == 1 else 1) / s.detach().min())
            torch.testing.assert_close(a.double() / scale, b / scale, rtol=0, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not has_ext_kernel("spread_log_likelihood"), reason="fastgen._C not built"))])
def test_gradcheck_float64(backend, kind):
    torch.manual_seed(0)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    for s in (torch.tensor(0.8, dtype=torch.float64, requires_grad=True),
              (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()):
        f = lambda a, b, c: _run(backend, a, b, c, kind=kind)  # noqa: E731
        assert torch.autograd.gradcheck(f, (y, x, s), eps=1e-6, atol=1e-5)
        assert f(y, x, s).dtype == torch.float64


@pytest.mark.parametrize("backend", BACKENDS)
def test_far_points_duplicates_and_matmul_expansion(backend):
    N, S, D = (64, 200, 32) if _shapes(backend) is SHAPES else (20, 40, 32)
    y, x = _offset_clustered(N, S, D, spread=0.05)
    want = reference(y, x, 0.5, "gaussian")
    out = _run(backend, y, x, 0.5)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=5e-5)
    # the expansion ||y||^2 - 2 y.x + ||x||^2 in float32 is far off on this data: the reason
    # for direct differences
    d2 = (y * y).sum(1, keepdim=True) - 2 * y @ x.T + (x * x).sum(1)
    expanded = torch.logsumexp(-d2 / (2 * 0.25), 1) - math.log(S) - D * (math.log(0.5) + 0.5 * math.log(2 * math.pi))
    assert (expanded.double() - want).abs().max() > 1.0
    # duplicated samples and y exactly on a sample
    xd = torch.cat([x, x[:3]])
    yd = torch.cat([y[:2], x[:2]])
    torch.testing.assert_close(_run(backend, yd, xd, 0.5).double(), reference(yd, xd, 0.5, "gaussian"),
                               rtol=1e-6, atol=5e-5)
    # a point far from every sample: a large finite negative value (no NaN)
    far = _run(backend, torch.full((1, D), 1e3 + 40.0), x, 0.5)
    assert torch.isfinite(far).all()
    torch.testing.assert_close(far.double(), reference(torch.full((1, D), 1e3 + 40.0), x, 0.5, "gaussian"),
                               rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes(backend, dtype):
    y, x = _offset_clustered(9, 21, 5, offset=3.0)
    y, x = y.to(dtype), x.to(dtype)
    out = _run(backend, y, x, 0.9, kind="laplace")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 5e-5
    torch.testing.assert_close(out.double(), reference(y, x, 0.9, "laplace"), rtol=tol, atol=tol)


def test_errors():
    y, x = torch.randn(4, 3), torch.randn(5, 3)
    for bad in (0.0, -1.0, float("nan"), float("inf"), torch.tensor([0.5, 0.0, 1.0])):
        with pytest.raises(ValueError, match="sigma"):
            fastgen.spread_log_likelihood(y, x, bad)
    with pytest.raises(ValueError, match="sigma"):
        fastgen.spread_log_likelihood(y, x, torch.ones(4))
    with pytest.raises(TypeError, match="sigma"):
        fastgen.spread_log_likelihood(y, x, "1")
    with pytest.raises(ValueError, match="samples"):
        fastgen.spread_log_likelihood(y, torch.randn(5, 4), 1.0)
    with pytest.raises(ValueError, match="y"):
        fastgen.spread_log_likelihood(torch.randn(4), x, 1.0)
    with pytest.raises(ValueError, match="samples"):
        fastgen.spread_log_likelihood(y, torch.randn(0, 3), 1.0)
    with pytest.raises(TypeError, match="y"):
        fastgen.spread_log_likelihood(y.long(), x, 1.0)
    with pytest.raises(ValueError, match="uniform"):
        fastgen.spread_log_likelihood(y, x, 1.0, kind="uniform")
    with pytest.raises(ValueError, match="kind"):
        fastgen.spread_log_likelihood(y, x, 1.0, kind="student")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_large(kind):
    y, x = _offset_clustered(2048, 8192, 64, seed=3)
    s = torch.full((64,), 0.5, requires_grad=True)
    want = reference(y, x, s.detach(), kind)
    out = fastgen.spread_log_likelihood(y.cuda(), x.cuda(), s.cuda(), kind=kind)
    torch.testing.assert_close(out.double().cpu(), want, rtol=2e-6, atol=1e-4)


# ------------------------------------------------------------------------------ torch.func
F64 = torch.float64


def _func_inputs(sd, N=5, S=4, D=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(N, D, dtype=F64, generator=g)
    x = torch.randn(S, D, dtype=F64, generator=g)
    s = torch.rand(sd, dtype=F64, generator=g) + 0.5
    return y, x, s


def _f(backend, kind):
    def f(y, x, s):
        with use_backend(backend, "spread_log_likelihood"):
            return fastgen.spread_log_likelihood(y, x, s, kind=kind)
    return f


def _ref(kind):
    return lambda y, x, s: reference(y, x, s, kind)


@pytest.mark.parametrize("sd", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_gradgradcheck_all_flags(backend, kind, sd):
    """First order (reverse, forward, batched both ways) and second order (double backward,
    forward-over-reverse, batched) w.r.t. y, samples and sigma, float64."""
    f = _f(backend, kind)
    inputs = tuple(a.requires_grad_() for a in _func_inputs(sd))
    fast = backend == "triton" and not torch.cuda.is_available()  # the interpreter: fewer evaluations
    assert torch.autograd.gradcheck(f, inputs, **GRAD_FLAGS, fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True, check_batched_grad=True, fast_mode=fast)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_reference(backend, kind):
    """Hessian-vector products through create_graph=True (not silently zero), data offset by 10."""
    f = _f(backend, kind)
    y, x, s = (a + 10 if a.shape[0] != 3 else a for a in _func_inputs(3))
    vs = [torch.randn_like(a) for a in (y, x, s)]
    g = torch.randn(y.shape[0], dtype=F64)
    outs = []
    for fn in (f, _ref(kind)):
        leaves = [a.clone().requires_grad_() for a in (y, x, s)]
        grads = torch.autograd.grad(fn(*leaves), leaves, g, create_graph=True)
        outs.append(torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, vs)), leaves))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    assert all(a.abs().max() > 0 for a in outs[0])


@pytest.mark.parametrize("sd", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_jacobians_hessian_vs_reference(backend, kind, sd):
    f, r = _f(backend, kind), _ref(kind)
    y, x, s = _func_inputs(sd)
    tang = tuple(torch.randn_like(a) for a in (y, x, s))
    of, jf = torch.func.jvp(f, (y, x, s), tang)
    orf, jr = torch.func.jvp(r, (y, x, s), tang)
    torch.testing.assert_close(of, orf)
    torch.testing.assert_close(jf, jr)
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        for a, b in zip(jac(f, argnums=(0, 1, 2))(y, x, s), jac(r, argnums=(0, 1, 2))(y, x, s)):
            torch.testing.assert_close(a, b)
    hf = torch.func.hessian(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(y, x, s)
    hr = torch.func.hessian(lambda *a: r(*a).sum(), argnums=(0, 1, 2))(y, x, s)
    for rf, rr in zip(hf, hr):
        for a, b in zip(rf, rr):
            torch.testing.assert_close(a, b)


def _count_launches(monkeypatch, backend):
    from fastgen.ops import spread_log_likelihood as sll

    impl = {"torch": sll._TorchImpl, "cpu": sll._CppImpl, "triton": getattr(sll, "_TritonImpl", None)}[backend]
    calls = []
    orig = impl.forward

    def counted(*a):
        calls.append(tuple(a[0].shape))
        return orig(*a)

    monkeypatch.setattr(impl, "forward", counted)
    return calls


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_vs_loop(backend, kind, monkeypatch):
    f, r = _f(backend, kind), _ref(kind)
    B = 4
    g = torch.Generator().manual_seed(3)
    yb = torch.randn(B, 5, 3, dtype=F64, generator=g)
    xb = torch.randn(B, 6, 3, dtype=F64, generator=g)
    sb = torch.rand(B, 3, dtype=F64, generator=g) + 0.5
    calls = _count_launches(monkeypatch, backend)
    # only y batched (batch dim not first): folded into N, one launch
    out = torch.func.vmap(f, in_dims=(1, None, None))(yb.movedim(0, 1), xb[0], sb[0])
    assert calls == [(B * 5, 3)]
    torch.testing.assert_close(out, torch.stack([r(yb[i], xb[0], sb[0]) for i in range(B)]))
    # samples and / or sigma batched: one launch per element
    for dims, args in (((0, 0, 0), (yb, xb, sb)), ((None, 0, None), (yb[0], xb, sb[0])),
                       ((0, None, 0), (yb, xb[0], sb)), ((None, None, 0), (yb[0], xb[0], sb))):
        calls.clear()
        out = torch.func.vmap(f, in_dims=dims)(*args)
        assert len(calls) == B
        loop = [r(*[a if d is None else a[i] for a, d in zip(args, dims)]) for i in range(B)]
        torch.testing.assert_close(out, torch.stack(loop))
    # a float sigma, nested vmap
    out = torch.func.vmap(torch.func.vmap(lambda y, x: f(y, x, 0.8), in_dims=(0, None)), in_dims=(None, 0))(yb, xb)
    torch.testing.assert_close(out, torch.stack([torch.stack([r(yb[j], xb[i], 0.8) for j in range(B)])
                                                 for i in range(B)]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients(backend, kind):
    """vmap(grad(f)): per-example gradients w.r.t. the shared samples and sigma (and the example
    itself) for a batch of examples, against a Python loop over the reference."""
    f, r = _f(backend, kind), _ref(kind)
    B = 5
    g = torch.Generator().manual_seed(4)
    yb = torch.randn(B, 2, 3, dtype=F64, generator=g)  # per example: 2 points
    x = torch.randn(6, 3, dtype=F64, generator=g)
    s = torch.rand(3, dtype=F64, generator=g) + 0.5

    def loss(fn):
        return lambda y, x, s: -fn(y, x, s).mean()

    got = torch.func.vmap(torch.func.grad(loss(f), argnums=(0, 1, 2)), in_dims=(0, None, None))(yb, x, s)
    for i in range(B):
        leaves = [yb[i].clone().requires_grad_(), x.clone().requires_grad_(), s.clone().requires_grad_()]
        want = torch.autograd.grad(loss(r)(*leaves), leaves)
        for a, b in zip(got, want):
            torch.testing.assert_close(a[i], b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_with_backward(backend):
    torch._dynamo.reset()

    def f(y, x, s):
        return fastgen.spread_log_likelihood(y, x, s, kind="laplace").sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, x, s = (a.float().requires_grad_() for a in _func_inputs(3, N=7, S=6, D=3))
    with use_backend(backend, "spread_log_likelihood"):
        got = cf(y, x, s)
        gg = torch.autograd.grad(got, [y, x, s])
        want = f(y, x, s)
        gw = torch.autograd.grad(want, [y, x, s])
    torch.testing.assert_close(got, want)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b)


def test_forward_over_forward_raises():
    f = _f("torch", "gaussian")
    y, x, s = _func_inputs(3)
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        torch.func.jacfwd(torch.func.jacfwd(lambda y: f(y, x, s).sum()))(y)
    v = torch.randn_like(y)
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        torch.func.jvp(lambda y: torch.func.jvp(lambda y: f(y, x, s), (y,), (v,))[1], (y,), (v,))
    # reverse-over-forward is fine
    h = torch.func.jacrev(torch.func.jacfwd(lambda y: f(y, x, s).sum()))(y)
    torch.testing.assert_close(h, torch.func.hessian(lambda y: _ref("gaussian")(y, x, s).sum())(y))
