"""PyTorch's own test cases for torch.nn.functional.gaussian_nll_loss / torch.nn.GaussianNLLLoss, run
against fastgen.gaussian_nll_loss / fastgen.nn.GaussianNLLLoss with torch as the oracle (issue 12),
and fastgen's torch.func support (vmap, per-sample gradients, jacrev / jacfwd / hessian, jvp,
torch.compile).

Cases are generated from the installed torch's test suite, not copied:

* the OpInfo ``nn.functional.gaussian_nll_loss`` (torch/testing/_internal/common_methods_invocations.py):
  every sample input (float64 and float32: values and gradients against torch), every float64
  sample through the checks its flags ask for (supports_forward_ad, supports_fwgrad_bwgrad,
  check_batched_grad, check_batched_gradgrad, check_batched_forward_grad, gradcheck_fast_mode):
  gradcheck(check_forward_ad, check_backward_ad, check_batched_grad, check_batched_forward_grad)
  and gradgradcheck(check_fwd_over_rev, check_batched_grad); every error input (same exception
  type, torch's message);
* the ModuleInfo ``torch.nn.GaussianNLLLoss`` (common_modules.py): module inputs, forward against
  torch and the reference_fn, and test_modules.py's gradient helper (total and partial
  derivatives) with gradcheck and gradgradcheck;
* test_nn.py (pytorch/pytorch, not in the wheel): test_gaussian_nll_loss_broadcasting,
  test_gaussian_nll_loss_args, test_gaussian_nll_loss_scalar_var, ported.

The kernels run single-threaded here (fixture): the shapes are tiny and OpenMP barriers on a busy
2-core machine cost milliseconds a call; tests/test_gaussian_nll.py covers the threaded splits.
"""
import random

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import fastgen
from fastgen.reference import gaussian_nll as ref

pytest.importorskip("expecttest")  # torch.testing._internal imports it (pip install expecttest)
from torch.testing._internal import common_utils  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

F64, F32 = torch.float64, torch.float32
OPINFO = next(o for o in op_db if o.name == "nn.functional.gaussian_nll_loss")
MODINFO = next(m for m in module_db if m.module_cls is torch.nn.GaussianNLLLoss)


def _samples(dtype):
    """The OpInfo's sample inputs (input, target, var, kwargs), detached; fixed seeds (make_tensor
    draws from torch's RNG, the eps values from Python's)."""
    torch.manual_seed(0)
    random.seed(0)
    out = [(s.input.detach(), s.args[0].detach(), s.args[1].detach(), dict(s.kwargs))
           for s in OPINFO.sample_inputs("cpu", dtype, requires_grad=False)]
    random.seed()
    return out


SAMPLES = {F64: _samples(F64), F32: _samples(F32)}
N_SAMPLES = len(SAMPLES[F64])


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


def _ours(x, t, v, **kw):
    return fastgen.gaussian_nll_loss(x, t, v, **kw)


# ---------------------------------------------------------------------------------------------
# OpInfo nn.functional.gaussian_nll_loss
# ---------------------------------------------------------------------------------------------
def test_opinfo_flags_and_sample_count():
    """The flags the checks below follow, as torch declares them (a change in torch shows here)."""
    assert OPINFO.supports_forward_ad and OPINFO.supports_fwgrad_bwgrad and OPINFO.supports_autograd
    assert OPINFO.check_batched_grad and OPINFO.check_batched_gradgrad and OPINFO.check_batched_forward_grad
    assert OPINFO.gradcheck_fast_mode
    assert N_SAMPLES == len(SAMPLES[F32]) == 324


@pytest.mark.parametrize("i", range(N_SAMPLES))
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_opinfo_sample_values_and_grads(dtype, i):
    x0, t0, v0, kw = SAMPLES[dtype][i]
    x, t, v = _leaves(x0, t0, v0)
    xr, tr, vr = _leaves(x0, t0, v0)
    out, want = _ours(x, t, v, **kw), F.gaussian_nll_loss(xr, tr, vr, **kw)
    assert out.shape == want.shape and out.dtype == want.dtype
    torch.testing.assert_close(out, want)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(out, [x, t, v], g), torch.autograd.grad(want, [xr, tr, vr], g)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("i", range(N_SAMPLES))
def test_opinfo_gradcheck(i):
    x0, t0, v0, kw = SAMPLES[F64][i]
    assert gradcheck(lambda x, t, v: _ours(x, t, v, **kw), tuple(_leaves(x0, t0, v0)),
                     check_forward_ad=OPINFO.supports_forward_ad, check_backward_ad=True,
                     check_batched_grad=OPINFO.check_batched_grad,
                     check_batched_forward_grad=OPINFO.check_batched_forward_grad,
                     fast_mode=OPINFO.gradcheck_fast_mode)


@pytest.mark.parametrize("i", range(N_SAMPLES))
def test_opinfo_gradgradcheck(i):
    x0, t0, v0, kw = SAMPLES[F64][i]
    assert gradgradcheck(lambda x, t, v: _ours(x, t, v, **kw), tuple(_leaves(x0, t0, v0)),
                         check_fwd_over_rev=OPINFO.supports_fwgrad_bwgrad,
                         check_batched_grad=OPINFO.check_batched_gradgrad, fast_mode=OPINFO.gradcheck_fast_mode)


ERRORS = list(OPINFO.error_inputs("cpu"))


@pytest.mark.parametrize("j", range(len(ERRORS)))
@pytest.mark.parametrize("form", ["functional", "module"])
def test_opinfo_error_inputs(j, form):
    """Same exception type as torch, and torch's message (the OpInfo's regex)."""
    e = ERRORS[j]
    s = e.sample_input
    for fn in (F.gaussian_nll_loss, fastgen.gaussian_nll_loss):  # torch: the oracle still holds
        if form == "module":
            mod = torch.nn.GaussianNLLLoss if fn is F.gaussian_nll_loss else fastgen.nn.GaussianNLLLoss
            kw = dict(s.kwargs)
            fn = mod(**kw)
            kwargs = {}
        else:
            kwargs = s.kwargs
        with pytest.raises(e.error_type, match=e.error_regex):
            fn(s.input, *s.args, **kwargs)


# ---------------------------------------------------------------------------------------------
# ModuleInfo torch.nn.GaussianNLLLoss (test_modules.py: test_forward, test_grad, test_gradgrad)
# ---------------------------------------------------------------------------------------------
def _module_inputs(dtype, requires_grad):
    torch.manual_seed(0)
    return MODINFO.module_inputs_func(MODINFO, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                      training=True)


# test_forward builds its inputs without grad (reference_fn deep-copies them), the gradient tests with
MODULE_FWD = {F64: _module_inputs(F64, False), F32: _module_inputs(F32, False)}
MODULE_INPUTS = {F64: _module_inputs(F64, True)}


@pytest.mark.parametrize("k", range(len(MODULE_INPUTS[F64])))
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_module_forward(dtype, k):
    mi = MODULE_FWD[dtype][k]
    c, f = mi.constructor_input, mi.forward_input
    ours, theirs = fastgen.nn.GaussianNLLLoss(*c.args, **c.kwargs), torch.nn.GaussianNLLLoss(*c.args, **c.kwargs)
    out = ours(*f.args, **f.kwargs)
    torch.testing.assert_close(out, theirs(*f.args, **f.kwargs))
    if mi.reference_fn is not None:  # test_modules.test_forward's check
        torch.testing.assert_close(out, mi.reference_fn(ours, *f.args, **f.kwargs))


def _module_gradients(k, check):
    """test_modules.py's _test_gradients_helper: the total derivative, then each input alone."""
    mi = MODULE_INPUTS[F64][k]
    c, f = mi.constructor_input, mi.forward_input
    m = fastgen.nn.GaussianNLLLoss(*c.args, **c.kwargs)
    args = tuple(f.args)

    def fn(*flat):
        return torch.utils._pytree.tree_leaves(m(*flat, **f.kwargs))

    assert check(fn, args)
    req = [a.requires_grad for a in args]
    for i, r in enumerate(req):  # partial derivatives
        if not r:
            continue
        part = [a.detach().requires_grad_(j == i) if isinstance(a, torch.Tensor) else a for j, a in enumerate(args)]
        assert check(fn, tuple(part))


@pytest.mark.parametrize("k", range(len(MODULE_INPUTS[F64])))
def test_module_grad(k):
    _module_gradients(k, common_utils.gradcheck)  # check_batched_grad=True, fast_mode=True


@pytest.mark.parametrize("k", range(len(MODULE_INPUTS[F64])))
def test_module_gradgrad(k):
    _module_gradients(k, common_utils.gradgradcheck)


@pytest.mark.parametrize("k", range(len(MODULE_INPUTS[F64])))
def test_module_double_backward_not_zero(k):
    """The issue's failure: the module's second derivative was silently zero. Compare d/dvar of
    the var gradient with torch's."""
    mi = MODULE_INPUTS[F64][k]
    c, f = mi.constructor_input, mi.forward_input
    x, t, v = (a.detach() for a in f.args)
    got = []
    for mod in (fastgen.nn.GaussianNLLLoss, torch.nn.GaussianNLLLoss):
        xx, vv = x.clone().requires_grad_(), v.clone().requires_grad_()
        out = mod(*c.args, **c.kwargs)(xx, t, vv).sum()
        gx, gv = torch.autograd.grad(out, [xx, vv], create_graph=True)
        got.append(torch.autograd.grad(gx.sum() + (gv ** 2).sum(), [xx, vv]))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b)
    assert got[0][1].abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# test_nn.py (pytorch/pytorch test/test_nn.py, TestNN), ported
# ---------------------------------------------------------------------------------------------
def test_nn_gaussian_nll_loss_broadcasting():
    input = torch.tensor([[0.5, 1.5, 2.5], [2., 4., 6.]])
    target_full = torch.tensor([[1., 2., 3.], [1., 2., 3.]])
    target_part = torch.tensor([[1., 2., 3.]])
    var_full = torch.tensor([[0.5, 0.5, 0.5], [1.5, 1.5, 1.5]])
    var_part1 = torch.tensor([[0.5], [1.5]])
    var_part2 = torch.tensor([0.5, 1.5])
    component_wise_loss = 0.5 * (torch.log(var_full) + (input - target_full) ** 2 / var_full)
    for tgt, var in ((target_part, var_full), (target_full, var_part1), (target_full, var_part2),
                     (target_part, var_part1), (target_part, var_part2)):
        torch.testing.assert_close(component_wise_loss, fastgen.gaussian_nll_loss(input, tgt, var, reduction="none"))


def test_nn_gaussian_nll_loss_args():
    input = torch.randn(3, 5)
    with pytest.raises(ValueError, match="var is of incorrect size"):
        target = torch.randn(3, 5)
        var = torch.ones(3, 3)
        fastgen.gaussian_nll_loss(input, target, var)
    with pytest.raises(ValueError, match="var has negative entry/entries"):
        var = -1 * torch.ones(3, 5)
        fastgen.gaussian_nll_loss(input, target, var)
    with pytest.raises(ValueError, match="var has negative entry/entries"):
        var = -1.0
        fastgen.gaussian_nll_loss(input, target, var)


def test_nn_gaussian_nll_loss_scalar_var():
    input = torch.tensor([[0.5, 1.5, 2.5], [2., 4., 6.]])
    target = torch.tensor([[1., 2., 3.], [1., 2., 3.]])
    var = 0.5
    var_tensor = var * torch.ones_like(input)
    component_wise_loss = 0.5 * (torch.log(var_tensor) + (input - target) ** 2 / var_tensor)
    torch.testing.assert_close(component_wise_loss, fastgen.gaussian_nll_loss(input, target, var, reduction="none"))
    torch.testing.assert_close(fastgen.gaussian_nll_loss(input, target, var_tensor, reduction="none"),
                               fastgen.gaussian_nll_loss(input, target, var, reduction="none"))


# ---------------------------------------------------------------------------------------------
# torch.func: vmap, per-sample gradients, jacrev / jacfwd / hessian, forward-mode AD
# ---------------------------------------------------------------------------------------------
import torch.func as TF  # noqa: E402
from torch.autograd import forward_ad as fwAD  # noqa: E402


def _formula(x, t, v, full=False, eps=1e-6, reduction="mean", log_var=False, beta=0.0):
    """The plain-torch reference (torch's formula op for op; no data-dependent sign check)."""
    return ref.nll_formula(x, t, v, full, eps, reduction, log_var, beta)


def _batch(vkind, B=5, log_var=False):
    x, t = torch.randn(B, 4, 3, dtype=F64), torch.randn(B, 4, 3, dtype=F64)
    vs = {"elem": (B, 4, 3), "row": (B, 4, 1), "fewer": (B, 4)}[vkind]
    v = torch.randn(vs, dtype=F64) if log_var else torch.rand(vs, dtype=F64) + 0.1
    return x, t, v


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("vkind", ["elem", "row", "fewer"])
@pytest.mark.parametrize("log_var,beta", [(False, 0.0), (True, 0.0), (False, 0.5), (True, 0.5)])
def test_vmap_matches_loop(reduction, vkind, log_var, beta):
    x, t, v = _batch(vkind, log_var=log_var)
    kw = dict(full=True, reduction=reduction, log_var=log_var, beta=beta)
    got = TF.vmap(lambda x, t, v: fastgen.gaussian_nll_loss(x, t, v, **kw))(x, t, v)
    want = torch.stack([fastgen.gaussian_nll_loss(x[i], t[i], v[i], **kw) for i in range(len(x))])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if not log_var and beta == 0.0:  # and torch's values, sample by sample
        tw = torch.stack([F.gaussian_nll_loss(x[i], t[i], v[i], full=True, reduction=reduction) for i in range(len(x))])
        torch.testing.assert_close(got, tw, rtol=1e-12, atol=1e-12)
    # other in_dims: a shared target and var (unbatched), the batch in dim 1 of input, a float var
    got = TF.vmap(lambda x, t, v: fastgen.gaussian_nll_loss(x, t, v, **kw), in_dims=(1, None, None))(
        x.movedim(0, 1), t[0], v[0])
    want = torch.stack([fastgen.gaussian_nll_loss(x[i], t[0], v[0], **kw) for i in range(len(x))])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got = TF.vmap(lambda t: fastgen.gaussian_nll_loss(x[0], t, 0.7, full=True, reduction=reduction))(t)
    want = torch.stack([F.gaussian_nll_loss(x[0], t[i], 0.7, full=True, reduction=reduction) for i in range(len(t))])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_vmap_one_call_and_negative_var(monkeypatch):
    """vmap runs the op once on the batched shape (no Python loop), and the negative-var check
    works under vmap (inside the op); torch's own check is Python control flow on data there."""
    from fastgen.ops import gaussian_nll as mod

    calls = []
    real = mod._run_forward
    monkeypatch.setattr(mod, "_run_forward", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    x, t, v = _batch("row", B=7)
    TF.vmap(fastgen.gaussian_nll_loss)(x, t, v)
    assert calls == [torch.Size([7, 4, 3])]
    v[3, 2, 0] = -0.5
    with pytest.raises(ValueError, match="var has negative entry/entries"):
        TF.vmap(fastgen.gaussian_nll_loss)(x, t, v)
    # check_var=False: no check, the clamped value (torch without its check)
    got = TF.vmap(lambda x, t, v: fastgen.gaussian_nll_loss(x, t, v, check_var=False))(x, t, v)
    want = torch.stack([_formula(x[i], t[i], v[i]) for i in range(7)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("log_var", [False, True])
def test_per_sample_gradients_vmap_grad(log_var):
    """vmap(grad(f)) through a model whose loss is gaussian_nll_loss (differential privacy /
    influence-function style) against a Python loop of autograd.grad with torch's loss."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 6).double()
    params = {k: p.detach() for k, p in model.named_parameters()}
    xb, yb = torch.randn(8, 5, dtype=F64), torch.randn(8, 3, dtype=F64)

    def loss(p, xi, yi, fn):
        out = torch.func.functional_call(model, p, (xi,))
        mu, s = out[:3], out[3:]
        return fn(mu, yi, s, full=True, log_var=True) if log_var else fn(mu, yi, torch.nn.functional.softplus(s),
                                                                          full=True)

    got = TF.vmap(TF.grad(lambda p, xi, yi: loss(p, xi, yi, fastgen.gaussian_nll_loss)), in_dims=(None, 0, 0))(
        params, xb, yb)
    for i in range(8):
        model.zero_grad()
        if log_var:
            out = model(xb[i])
            ref_loss = _formula(out[:3], yb[i], out[3:], full=True, log_var=True)
        else:
            ref_loss = loss(dict(model.named_parameters()), xb[i], yb[i], F.gaussian_nll_loss)
        grads = torch.autograd.grad(ref_loss, list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), grads):
            torch.testing.assert_close(got[name][i], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("log_var,beta", [(False, 0.0), (True, 0.0), (False, 0.5), (True, 1.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_jacrev_jacfwd_hessian_match_reference(reduction, log_var, beta):
    torch.manual_seed(1)
    x, t = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    v = torch.randn(3, 1, dtype=F64) if log_var else torch.rand(3, 1, dtype=F64) + 0.2
    kw = dict(full=True, eps=1e-6, reduction=reduction, log_var=log_var, beta=beta)

    def ours(x, t, v):
        return fastgen.gaussian_nll_loss(x, t, v, **kw)

    def theirs(x, t, v):
        return _formula(x, t, v, **kw)

    for jac in (TF.jacrev, TF.jacfwd):
        for a, b in zip(jac(ours, argnums=(0, 1, 2))(x, t, v), jac(theirs, argnums=(0, 1, 2))(x, t, v)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    if reduction != "none":
        # hessian = jacfwd(jacrev): forward-over-reverse; and reverse-over-reverse, reverse-over-forward
        for outer, inner in ((TF.jacfwd, TF.jacrev), (TF.jacrev, TF.jacrev), (TF.jacrev, TF.jacfwd)):
            h1 = outer(inner(ours, argnums=(0, 1, 2)), argnums=(0, 1, 2))(x, t, v)
            h2 = TF.hessian(theirs, argnums=(0, 1, 2))(x, t, v)
            for r1, r2 in zip(h1, h2):
                for a, b in zip(r1, r2):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_jvp_and_forward_ad_match_reference():
    torch.manual_seed(2)
    x, t, v = torch.randn(4, 5, dtype=F64), torch.randn(4, 5, dtype=F64), torch.rand(4, 5, dtype=F64) + 0.1
    tx, tt, tv = torch.randn_like(x), torch.randn_like(t), torch.randn_like(v)
    for reduction in ("mean", "sum", "none"):
        f = lambda x, t, v: fastgen.gaussian_nll_loss(x, t, v, reduction=reduction)  # noqa: E731
        g = lambda x, t, v: F.gaussian_nll_loss(x, t, v, reduction=reduction)  # noqa: E731
        a = TF.jvp(f, (x, t, v), (tx, tt, tv))
        b = TF.jvp(g, (x, t, v), (tx, tt, tv))
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        with fwAD.dual_level():  # torch.autograd.forward_ad, one tangent (only var's)
            out = f(x, t, fwAD.make_dual(v, tv))
            want = g(x, t, fwAD.make_dual(v, tv))
            torch.testing.assert_close(fwAD.unpack_dual(out).tangent, fwAD.unpack_dual(want).tangent,
                                       rtol=1e-12, atol=1e-12)
    # var below eps: every derivative passes straight through the clamp (torch's first-order rule)
    vs = torch.tensor([[0.0, 1e-9, 0.3]], dtype=F64)
    xs, ts = torch.randn(1, 3, dtype=F64), torch.randn(1, 3, dtype=F64)
    grev = TF.grad(lambda v: fastgen.gaussian_nll_loss(xs, ts, v, eps=1e-3), argnums=0)(vs)
    gtorch = TF.grad(lambda v: F.gaussian_nll_loss(xs, ts, v, eps=1e-3), argnums=0)(vs)
    torch.testing.assert_close(grev, gtorch, rtol=1e-12, atol=1e-12)
    gfwd = TF.jacfwd(lambda v: fastgen.gaussian_nll_loss(xs, ts, v, eps=1e-3))(vs)
    torch.testing.assert_close(gfwd, grev, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): backward, and second derivatives through torch.func inside it
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_backward_and_hessian(backend):
    torch.manual_seed(3)
    x = torch.randn(6, 4, dtype=F64, requires_grad=True)
    t = torch.randn(6, 4, dtype=F64, requires_grad=True)
    v = (torch.rand(6, 1, dtype=F64) + 0.2).requires_grad_()
    lv = torch.randn(6, 4, dtype=F64, requires_grad=True)

    def f(x, t, v, lv):
        return (fastgen.gaussian_nll_loss(x, t, v, full=True) + fastgen.gaussian_nll_loss(x, t, v, reduction="sum")
                + fastgen.gaussian_nll_loss(x, t, lv, reduction="none", log_var=True, beta=0.5).mean()
                + fastgen.nn.GaussianNLLLoss(eps=0.3)(x, t, 0.2))

    cf = torch.compile(f, fullgraph=True, backend=backend)
    got, want = cf(x, t, v, lv), f(x, t, v, lv)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(2.5 * got, [x, t, v, lv]), torch.autograd.grad(2.5 * want, [x, t, v, lv])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # second derivatives under compile: torch.func inside the compiled function (create_graph
    # through a compiled region is torch.compile's limitation for every op)
    h = torch.compile(TF.hessian(lambda x, v: f(x, t.detach(), v, lv.detach()), argnums=(0, 1)), fullgraph=True,
                      backend=backend)(x.detach(), v.detach())
    hw = TF.hessian(lambda x, v: f(x, t.detach(), v, lv.detach()), argnums=(0, 1))(x.detach(), v.detach())
    for r1, r2 in zip(h, hw):
        for a, b in zip(r1, r2):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    psg = torch.compile(TF.vmap(TF.grad(lambda x, v: fastgen.gaussian_nll_loss(x, t[0].detach(), v))), fullgraph=True,
                        backend=backend)(x.detach(), v.detach().expand(6, 4).contiguous())
    want = torch.stack([TF.grad(lambda x: F.gaussian_nll_loss(x, t[0].detach(), v[i].detach().expand(4)))(x[i].detach())
                        for i in range(6)])
    torch.testing.assert_close(psg, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nested_transforms_see_the_output(reduction):
    """An outer torch.func level differentiates the primal output of an inner vjp / jvp (the op's
    forward must stay visible to the outer levels), and jacrev(grad(f))."""
    torch.manual_seed(4)
    x, t, v = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64), torch.rand(3, 4, dtype=F64) + 0.2
    ours = lambda x: fastgen.gaussian_nll_loss(x, t, v, reduction=reduction)  # noqa: E731
    theirs = lambda x: F.gaussian_nll_loss(x, t, v, reduction=reduction)  # noqa: E731
    ones = torch.ones_like(x)
    for fn in (lambda h: TF.jacrev(lambda x: TF.vjp(h, x)[0])(x),
               lambda h: TF.jacfwd(lambda x: TF.vjp(h, x)[0])(x),
               lambda h: TF.jacrev(lambda x: TF.jvp(h, (x,), (ones,))[0])(x),
               lambda h: TF.jacrev(TF.grad(lambda x: h(x).sum()))(x),
               lambda h: TF.grad(lambda x: h(x).sum() * TF.grad(lambda y: h(y).sum())(x).sum())(x)):
        torch.testing.assert_close(fn(ours), fn(theirs), rtol=1e-10, atol=1e-12)
