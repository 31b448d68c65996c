"""fastgen.gaussian_nll_loss / fastgen.nn.GaussianNLLLoss against torch.nn.functional.gaussian_nll_loss
and the reference (log_var, beta-NLL), on every backend available here (Triton in the
interpreter on CPU)."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastgen
from fastgen._dispatch import use_backend
from fastgen.reference import gaussian_nll as ref

from conftest import backends_for, has_ext_kernel

BACKENDS = backends_for("gaussian_nll")
REDUCTIONS = ("mean", "sum", "none")

# var shapes torch accepts for input [4, 6, 5]: same, one dimension fewer, trailing 1,
# a size-1 dimension in the middle / in front, and a Python float.
VAR_SHAPES = [(4, 6, 5), (4, 6), (4, 6, 1), (4, 1, 5), (1, 6, 5), "float"]


def _var(shape, dtype=torch.float64, low=0.05):
    if shape == "float":
        return 0.7
    return (torch.rand(shape, dtype=dtype) * 2 + low).requires_grad_()


def _leaves(*ts):
    return [t for t in ts if isinstance(t, torch.Tensor) and t.requires_grad]


def _compare(out, want, inputs, *, rtol, atol):
    """Values and gradients (for a random grad_output) of out vs want w.r.t. inputs."""
    assert out.shape == want.shape and out.dtype == want.dtype, (out.shape, want.shape, out.dtype, want.dtype)
    torch.testing.assert_close(out, want, rtol=rtol, atol=atol)
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, inputs, g, allow_unused=False)
    exp = torch.autograd.grad(want, inputs, g)
    for a, b in zip(got, exp):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def _run(backend, *args, **kw):
    with use_backend(backend, "gaussian_nll"):
        return fastgen.gaussian_nll_loss(*args, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vshape", VAR_SHAPES, ids=str)
def test_matches_torch_every_var_shape_reduction_full(backend, vshape):
    for dtype, tol in ((torch.float32, 2e-5), (torch.float64, 1e-12)):
        for reduction in REDUCTIONS:
            for full in (False, True):
                # data far from the origin: the difference is small next to the values
                x = (torch.randn(4, 6, 5, dtype=dtype) + 100).requires_grad_()
                t = (torch.randn(4, 6, 5, dtype=dtype) + 100).requires_grad_()
                v = _var(vshape, dtype)
                out = _run(backend, x, t, v, full, 1e-6, reduction)
                want = F.gaussian_nll_loss(x, t, v, full=full, eps=1e-6, reduction=reduction)
                _compare(out, want, _leaves(x, t, v), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_other_ranks_and_positional_arguments(backend):
    cases = [((7,), ()), ((7,), (7,)), ((3, 1), (3,)), ((5, 3), (5, 1)), ((), ()), ((2, 3, 4, 5), (2, 3, 1, 5)),
             ((2, 3, 4, 5), (2, 3, 4)), ((2, 3, 4, 5), (1, 3, 4, 5))]
    for xs, vs in cases:
        x = torch.randn(xs, dtype=torch.float64, requires_grad=True)
        t = torch.randn(xs, dtype=torch.float64)
        v = (torch.rand(vs, dtype=torch.float64) + 0.1).requires_grad_()
        for reduction in REDUCTIONS:
            out = _run(backend, x, t, v, True, 1e-3, reduction)  # full, eps, reduction positionally
            want = F.gaussian_nll_loss(x, t, v, True, 1e-3, reduction)
            _compare(out, want, [x, v], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eps_clamp_straight_through_gradient(backend):
    # var below eps, exactly zero and exactly eps: the clamp changes the value, not the gradient path
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 8, dtype=torch.float64)
    for eps in (1e-6, 0.1, 0.5):
        base = torch.tensor([0.0, 1e-9, eps, 0.05, 0.3, 0.6, 2.0, 1e-7], dtype=torch.float64)
        v = base.repeat(3, 1).requires_grad_()
        for reduction in REDUCTIONS:
            out = _run(backend, x, t, v, False, eps, reduction)
            want = F.gaussian_nll_loss(x, t, v, eps=eps, reduction=reduction)
            _compare(out, want, [x, v], rtol=1e-10, atol=1e-10)
        # homoscedastic var below eps (one value per row) and a float var below eps
        vr = torch.tensor([[0.0], [eps / 2], [1.0]], dtype=torch.float64, requires_grad=True)
        _compare(_run(backend, x, t, vr, False, eps), F.gaussian_nll_loss(x, t, vr, eps=eps), [x, vr],
                 rtol=1e-10, atol=1e-10)
        _compare(_run(backend, x, t, 1e-9, False, eps, "sum"), F.gaussian_nll_loss(x, t, 1e-9, eps=eps, reduction="sum"),
                 [x], rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_larger_shapes_split_across_tasks(backend):
    # enough elements for several OpenMP tasks / Triton programs, split reductions over b, C > tile
    torch.manual_seed(1)
    big = backend != "triton"
    cases = [((3, 40000 if big else 5000), (3, 40000 if big else 5000)),   # per element
             ((3, 40000 if big else 5000), (3, 1)),                        # one var per row, split over b
             ((1, 50000 if big else 6000), (1, 1)),                        # one var for everything
             ((2, 300, 600), (2, 1, 600)),                                 # middle broadcast, C > tile
             ((5, 70, 3), (5, 1, 3))]                                      # middle broadcast, tiny C
    for xs, vs in cases:
        x = (torch.randn(xs) * 3).requires_grad_()
        t = torch.randn(xs)
        v = (torch.rand(vs) + 0.1).requires_grad_()
        for reduction in ("mean", "sum"):
            out = _run(backend, x, t, v, False, 1e-6, reduction)
            x64, v64 = x.detach().double().requires_grad_(), v.detach().double().requires_grad_()
            want = F.gaussian_nll_loss(x64, t.double(), v64, reduction=reduction)
            g = torch.tensor(0.75, dtype=torch.float64)
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
            gx, gv = torch.autograd.grad(out, [x, v], g.float())
            ex, ev = torch.autograd.grad(want, [x64, v64], g)
            torch.testing.assert_close(gx.double(), ex, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(gv.double(), ev, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not has_ext_kernel("gaussian_nll"), reason="fastgen._C not built")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_large_outputs_start_on_huge_page_boundaries(reduction):
    # outputs of >= 8 MiB are 2 MiB-aligned views (csrc/cpu/boundary.h empty_huge): same values as
    # torch, contiguous, of the input's shape, and (for "none") the loss too
    torch.manual_seed(2)
    x = torch.randn(1024, 2049, requires_grad=True)  # 8.0 MiB + one row: odd tail
    t = torch.randn(1024, 2049)
    v = (torch.rand(1024, 2049) + 0.1).requires_grad_()
    with use_backend("cpu", "gaussian_nll"):
        out = fastgen.gaussian_nll_loss(x, t, v, reduction=reduction)
    x64, v64 = x.detach().double().requires_grad_(), v.detach().double().requires_grad_()
    want = F.gaussian_nll_loss(x64, t.double(), v64, reduction=reduction)
    g = torch.randn_like(want)
    gx, gv = torch.autograd.grad(out, [x, v], g.float())
    ex, ev = torch.autograd.grad(want, [x64, v64], g)
    outs = [gx, gv] + ([out] if reduction == "none" else [])
    for o in outs:
        assert o.shape == x.shape and o.is_contiguous()
        assert o.data_ptr() % (2 << 20) == 0
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), ex, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gv.double(), ev, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vshape", [(2, 3, 4), (2, 3), (2, 1, 4), "float"], ids=str)
@pytest.mark.parametrize("log_var", [False, True])
def test_gradcheck_float64(backend, vshape, log_var):
    # (beta-NLL is not checked here: stop_grad(var) ** beta makes its var gradient differ from
    # the finite differences by design; test_log_var_and_beta_match_reference covers it)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    v = _var(vshape, low=0.2)
    if log_var and isinstance(v, torch.Tensor):
        v = (torch.randn(vshape, dtype=torch.float64) * 0.5).requires_grad_()
    ins = _leaves(x, t, v)
    for reduction in REDUCTIONS:
        def f(*a):
            it = iter(a)
            xx, tt = next(it), next(it)
            vv = next(it) if isinstance(v, torch.Tensor) else v
            return _run(backend, xx, tt, vv, True, 1e-6, reduction, log_var=log_var)
        assert torch.autograd.gradcheck(f, ins, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vshape", [(4, 6, 5), (4, 6), (4, 1, 5), "float"], ids=str)
def test_log_var_and_beta_match_reference(backend, vshape):
    for log_var in (False, True):
        for beta in (0.0, 0.5, 1.0, 0.3):
            for reduction in REDUCTIONS:
                x = (torch.randn(4, 6, 5, dtype=torch.float64) - 50).requires_grad_()
                t = (torch.randn(4, 6, 5, dtype=torch.float64) - 50).requires_grad_()
                v = _var(vshape)
                if log_var and isinstance(v, torch.Tensor):
                    v = (torch.randn(vshape, dtype=torch.float64) * 2).requires_grad_()
                out = _run(backend, x, t, v, True, 1e-6, reduction, log_var=log_var, beta=beta)
                want = ref.gaussian_nll_loss(x, t, v, True, 1e-6, reduction, log_var=log_var, beta=beta)
                _compare(out, want, _leaves(x, t, v), rtol=1e-11, atol=1e-11)


def test_reference_definitions():
    # log_var: the same loss as var = exp(log_var); beta-NLL: weights stop_grad(var) ** beta
    x, t = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    lv = torch.randn(3, 5, dtype=torch.float64)
    a = ref.gaussian_nll_loss(x, t, lv, full=True, reduction="none", log_var=True)
    b = F.gaussian_nll_loss(x, t, lv.exp(), full=True, eps=0.0, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    v = (torch.rand(3, 5, dtype=torch.float64) + 0.1).requires_grad_()
    nb = ref.gaussian_nll_loss(x, t, v, full=True, reduction="none", beta=0.5)
    torch.testing.assert_close(nb, F.gaussian_nll_loss(x, t, v, full=True, reduction="none") * v.detach() ** 0.5)
    # the weight is a constant: d/dvar of the weighted loss = weight * d/dvar of the plain loss
    (gv,) = torch.autograd.grad(nb.sum(), [v])
    want = v.detach() ** 0.5 * 0.5 * (1 / v.detach() - (x - t) ** 2 / v.detach() ** 2)
    torch.testing.assert_close(gv, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs(backend, dtype):
    for vshape in [(6, 40), (6, 1), (6,)]:
        x = torch.randn(6, 40).to(dtype).requires_grad_()
        t = torch.randn(6, 40).to(dtype)
        v = (torch.rand(vshape) + 0.2).to(dtype).requires_grad_()
        for reduction in REDUCTIONS:
            out = _run(backend, x, t, v, True, 1e-6, reduction)
            want = F.gaussian_nll_loss(x, t, v, full=True, reduction=reduction)
            assert out.dtype == want.dtype == dtype and out.shape == want.shape
            # the exact loss of the (rounded) inputs, in float64
            x64, v64 = x.detach().double().requires_grad_(), v.detach().double().requires_grad_()
            exact = F.gaussian_nll_loss(x64, t.double(), v64, full=True, reduction=reduction)
            tol = 1e-2 if dtype == torch.float16 else 4e-2
            torch.testing.assert_close(out.double(), exact, rtol=tol, atol=tol)
            g = torch.randn_like(exact)
            gx, gv = torch.autograd.grad(out, [x, v], g.to(dtype))
            ex, ev = torch.autograd.grad(exact, [x64, v64], g.to(dtype).double())
            assert gx.dtype == gv.dtype == dtype
            torch.testing.assert_close(gx.double(), ex, rtol=tol, atol=tol * ex.abs().max().item())
            torch.testing.assert_close(gv.double(), ev, rtol=tol, atol=tol * ev.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_broadcast_target_and_odd_layouts(backend):
    # float16 input with float32 var: float32 result, like torch
    x = torch.randn(4, 5).half().requires_grad_()
    v = (torch.rand(4, 1) + 0.5).requires_grad_()
    t = torch.randn(4, 5)
    out, want = _run(backend, x, t, v), F.gaussian_nll_loss(x, t, v)
    assert out.dtype == want.dtype == torch.float32
    _compare(out, want, [x, v], rtol=1e-3, atol=1e-3)
    # integer target
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    ti = torch.randint(-2, 3, (4, 5))
    _compare(_run(backend, x, ti, 0.5, False, 1e-6, "none"), F.gaussian_nll_loss(x, ti, 0.5, reduction="none"),
             [x], rtol=1e-12, atol=1e-12)
    # target broadcast over a dimension of input, and input narrower than target
    for xs, ts, vs in [((4, 5), (1, 5), (4, 1)), ((4, 5), (4, 1), (4, 5)), ((4, 1), (4, 5), (4,)),
                       ((3, 4), (2, 3, 4), (3, 1)), ((3, 4), (2, 3, 4), (1, 4))]:
        x = torch.randn(xs, dtype=torch.float64, requires_grad=True)
        t = torch.randn(ts, dtype=torch.float64, requires_grad=True)
        v = (torch.rand(vs, dtype=torch.float64) + 0.1).requires_grad_()
        for reduction in REDUCTIONS:
            _compare(_run(backend, x, t, v, False, 1e-6, reduction),
                     F.gaussian_nll_loss(x, t, v, reduction=reduction), [x, t, v], rtol=1e-12, atol=1e-12)
    # non-contiguous inputs
    x = torch.randn(6, 8, dtype=torch.float64).t().requires_grad_()
    t = torch.randn(8, 12, dtype=torch.float64)[:, ::2]
    v = (torch.rand(6, 8, dtype=torch.float64) + 0.1).t().requires_grad_()
    _compare(_run(backend, x, t, v, False, 1e-6, "none"), F.gaussian_nll_loss(x, t, v, reduction="none"),
             [x, v], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_output_scaling_retain_graph_and_no_grad(backend):
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64)
    v = (torch.rand(5, 7, dtype=torch.float64) + 0.1).requires_grad_()
    for reduction in ("mean", "sum"):
        out = _run(backend, x, t, v, False, 1e-6, reduction)
        want = F.gaussian_nll_loss(x, t, v, reduction=reduction)
        (3.0 * out).backward(retain_graph=True)
        g1 = (x.grad.clone(), v.grad.clone())
        x.grad = v.grad = None
        out.backward()  # a second backward through the same graph, grad_output 1
        g2 = (x.grad.clone(), v.grad.clone())
        x.grad = v.grad = None
        (3.0 * want).backward()
        torch.testing.assert_close(g1[0], x.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g1[1], v.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(g2[0] * 3, x.grad, rtol=1e-12, atol=1e-12)
        x.grad = v.grad = None
    with torch.no_grad():
        out = _run(backend, x, t, v)
    assert not out.requires_grad
    torch.testing.assert_close(out, F.gaussian_nll_loss(x, t, v).detach(), rtol=1e-12, atol=1e-12)
    # only var requires grad
    out = _run(backend, x.detach(), t, v, False, 1e-6, "sum")
    (gv,) = torch.autograd.grad(out, [v])
    (ev,) = torch.autograd.grad(F.gaussian_nll_loss(x.detach(), t, v, reduction="sum"), [v])
    torch.testing.assert_close(gv, ev, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_special_values_like_torch(backend):
    x = torch.randn(3, 4)
    t = torch.randn(3, 4)
    v = torch.rand(3, 4) + 0.1
    v[0, 1] = float("nan")  # NaN is not negative: no error, NaN loss (torch: same)
    v[2, 2] = float("inf")
    for reduction in REDUCTIONS:
        torch.testing.assert_close(_run(backend, x, t, v, False, 1e-6, reduction),
                                   F.gaussian_nll_loss(x, t, v, reduction=reduction), equal_nan=True)
    # empty input: nan mean, zero sum, empty "none" (torch's values)
    e = torch.empty(0, 3)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(_run(backend, e, e, torch.ones(0, 3), False, 1e-6, reduction),
                                   F.gaussian_nll_loss(e, e, torch.ones(0, 3), reduction=reduction), equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_like_torch(backend):
    x, t = torch.randn(4, 3), torch.randn(4, 3)
    good = torch.rand(4, 3) + 0.1
    neg = good.clone()
    neg[2, 1] = -1e-3

    def both(exc, match, *args, **kw):
        with pytest.raises(exc, match=match):
            F.gaussian_nll_loss(*args, **kw)
        with pytest.raises(exc, match=match):
            _run(backend, *args, **kw)

    both(ValueError, "var has negative entry/entries", x, t, neg)
    both(ValueError, "var has negative entry/entries", x, t, neg[:, 1:2])
    both(ValueError, "var has negative entry/entries", x, t, -0.5)
    both(ValueError, "var has negative entry/entries", x, t, neg[:, :2])  # negative wins over bad size
    both(ValueError, "var has negative entry/entries", x, t, neg, reduction="nope")  # ... and bad reduction
    for bad in [(4, 2), (1, 1), (3,), (4, 3, 1), (2, 4, 3)]:
        both(ValueError, "var is of incorrect size", x, t, torch.ones(bad))
    both(ValueError, "nope is not valid", x, t, good, reduction="nope")
    both(TypeError, None, x, t, good, reduction=3)
    both(TypeError, None, x, t, 1)  # an int var is not accepted (torch: TypeError too)
    # fastgen's messages name the argument
    with pytest.raises(TypeError, match="var"):
        _run(backend, x, t, 1)
    with pytest.raises(TypeError, match="reduction"):
        _run(backend, x, t, good, reduction=None)
    with pytest.raises(ValueError, match="reduction"):
        _run(backend, x, t, good, reduction="avg")
    with pytest.raises(TypeError, match="input"):
        _run(backend, [1.0, 2.0], t, good)
    with pytest.raises(TypeError, match="target"):
        _run(backend, x, "t", good)
    with pytest.raises(TypeError, match="input"):
        _run(backend, torch.ones(4, 3, dtype=torch.int64), t, good)
    with pytest.raises(TypeError, match="var"):
        _run(backend, x, t, torch.ones(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="beta"):
        _run(backend, x, t, good, beta=-0.5)
    with pytest.raises(TypeError, match="beta"):
        _run(backend, x, t, good, beta="1")
    with pytest.raises(TypeError, match="eps"):
        _run(backend, x, t, good, eps=None)
    with pytest.raises(ValueError, match="device"):
        _run(backend, x, t, torch.ones(4, 3, device="meta"))
    with pytest.raises(ValueError, match="target"):  # not broadcastable: torch raises RuntimeError
        _run(backend, x, torch.randn(4, 2), good)
    with pytest.raises(RuntimeError):
        _run(backend, x, torch.randn(4, 2), good)
    # log_var: negative entries are log-variances, not an error
    out = _run(backend, x, t, neg, log_var=True)
    torch.testing.assert_close(out, ref.gaussian_nll_loss(x, t, neg, log_var=True))


def test_auto_backend_and_module():
    from fastgen import _backend, _dispatch

    name, _ = _dispatch.select("gaussian_nll", "auto", "cpu")
    assert name == ("cpu" if _backend.has_kernel("gaussian_nll", "CPU") else "torch")
    x = torch.randn(8, 3, requires_grad=True)
    t = torch.randn(8, 3)
    v = (torch.rand(8, 1) + 0.1).requires_grad_()
    for kw in ({}, {"full": True}, {"eps": 0.3}, {"reduction": "sum"}, {"reduction": "none"}):
        ours, theirs = fastgen.nn.GaussianNLLLoss(**kw), torch.nn.GaussianNLLLoss(**kw)
        assert (ours.full, ours.eps, ours.reduction) == (theirs.full, theirs.eps, theirs.reduction)
        _compare(ours(x, t, v), theirs(x, t, v), [x, v], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x, t, 0.4), theirs(x, t, 0.4))
    assert fastgen.nn.GaussianNLLLoss(True, 0.1, "sum").full is True  # positional, as in DESIGN.md
    m = fastgen.nn.GaussianNLLLoss(log_var=True, beta=0.5)
    assert "log_var=True" in repr(m) and "beta=0.5" in repr(m) and m.state_dict() == {}
    torch.testing.assert_close(m(x, t, v), ref.gaussian_nll_loss(x, t, v, log_var=True, beta=0.5))
    with pytest.raises(ValueError, match="not valid"):  # like torch: checked in forward
        fastgen.nn.GaussianNLLLoss(reduction="bad")(x, t, v)
    with pytest.raises(ValueError, match="beta"):
        fastgen.nn.GaussianNLLLoss(beta=-1.0)
    with pytest.raises(ValueError, match="var has negative"):
        fastgen.nn.GaussianNLLLoss()(x, t, -v.detach())
    assert math.isclose(float(fastgen.gaussian_nll_loss(torch.zeros(3), torch.zeros(3), 1.0, full=True)),
                        0.5 * math.log(2 * math.pi), rel_tol=1e-6)


# ---- real GPU (skipped without CUDA): large shapes, > 2^31 elements, fp16 / bf16 ---------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vkind", ["elem", "row", "middle"])
def test_gpu_large_shapes(dtype, vkind):
    dev = "cuda"
    shape = (8192, 16384) if vkind != "middle" else (64, 128, 16384)
    vshape = {"elem": shape, "row": (8192, 1), "middle": (64, 1, 16384)}[vkind]
    x = torch.randn(shape, device=dev).to(dtype).requires_grad_()
    t = torch.randn(shape, device=dev).to(dtype)
    v = (torch.rand(vshape, device=dev) + 0.1).to(dtype).requires_grad_()
    for reduction in ("mean", "sum"):
        with use_backend("triton", "gaussian_nll"):
            out = fastgen.gaussian_nll_loss(x, t, v, full=True, reduction=reduction)
        gx, gv = torch.autograd.grad(out, [x, v])
        x64, v64 = x.detach().double().requires_grad_(), v.detach().double().requires_grad_()
        want = F.gaussian_nll_loss(x64, t.double(), v64, full=True, reduction=reduction)
        ex, ev = torch.autograd.grad(want, [x64, v64])
        assert out.dtype == dtype and gx.dtype == gv.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(gx.double(), ex, rtol=tol, atol=tol * ex.abs().max().item())
        torch.testing.assert_close(gv.double(), ev, rtol=tol * 10, atol=tol * ev.abs().max().item())
        del gx, gv, ex, ev, x64, v64
    with use_backend("triton", "gaussian_nll"):
        none = fastgen.gaussian_nll_loss(x, t, v, reduction="none")
    torch.testing.assert_close(none.float(), F.gaussian_nll_loss(x.float(), t.float(), v.float(), reduction="none"),
                               rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("vkind", ["elem", "row"])
def test_gpu_more_than_2_31_elements(vkind):
    # int64 offsets: the elements past 2^31 get the right loss and gradients (bfloat16: 4 GiB a tensor)
    dev, dtype = "cuda", torch.bfloat16
    rows, cols = 2**16 + 8, 2**15
    x = torch.randn(rows, cols, device=dev, dtype=dtype).requires_grad_()
    t = torch.randn(rows, cols, device=dev, dtype=dtype)
    v = (torch.rand(rows, cols if vkind == "elem" else 1, device=dev) + 0.5).to(dtype).requires_grad_()
    assert x.numel() > 2**31
    with use_backend("triton", "gaussian_nll"):
        out = fastgen.gaussian_nll_loss(x, t, v, reduction="sum")
    gx, gv = torch.autograd.grad(out, [x, v])
    want = 0.0
    for r0 in range(0, rows, 4096):  # float64 reference in chunks
        sl = slice(r0, r0 + 4096)
        want += float(F.gaussian_nll_loss(x[sl].double(), t[sl].double(), v[sl].double(), reduction="sum"))
    assert abs(float(out) - want) <= 1e-2 * abs(want)
    tail = slice(rows - 16, rows)  # rows entirely beyond element 2^31
    xx, vv = x[tail].detach().double().requires_grad_(), v[tail].detach().double().requires_grad_()
    ex, ev = torch.autograd.grad(F.gaussian_nll_loss(xx, t[tail].double(), vv, reduction="sum"), [xx, vv])
    torch.testing.assert_close(gx[tail].double(), ex, rtol=2e-2, atol=2e-2 * ex.abs().max().item())
    torch.testing.assert_close(gv[tail].double(), ev, rtol=2e-2, atol=2e-2 * ev.abs().max().item())


@pytest.mark.gpu
def test_gpu_no_host_sync_with_log_var_and_scale_on_device():
    # log_var: no negative-var check, so no host read; grad_output != 1 is applied on device
    dev = "cuda"
    x = torch.randn(1024, 4096, device=dev, requires_grad=True)
    t = torch.randn(1024, 4096, device=dev)
    lv = torch.randn(1024, 4096, device=dev, requires_grad=True)
    with use_backend("triton", "gaussian_nll"):
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fastgen.gaussian_nll_loss(x, t, lv, log_var=True, beta=0.5)
            (2.5 * out).backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    xx, ll = x.detach().clone().requires_grad_(), lv.detach().clone().requires_grad_()
    (2.5 * ref.gaussian_nll_loss(xx, t, ll, log_var=True, beta=0.5)).backward()
    torch.testing.assert_close(x.grad, xx.grad, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(lv.grad, ll.grad, rtol=1e-5, atol=1e-9)
