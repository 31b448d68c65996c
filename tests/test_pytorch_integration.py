"""fastgen ops as first-class PyTorch citizens (issue 7).

* torch.library.opcheck of every fastgen custom op (schema, fake kernel, autograd
  registration, AOT dispatch) on every backend available here;
* the custom-op path (what torch.compile sees) against the eager path;
* torch.compile(fullgraph=True) of training steps (one real inductor graph; aot_eager elsewhere,
  inductor is slow on 2 cores), the backend still chosen when the op runs;
* gaussian_nll_loss's check_var, autocast dtypes, determinism;
* gpu-marked: CUDA graph capture and torch.cuda.set_sync_debug_mode("error").
"""
import math
import operator

import pytest
import torch

import fastgen
from fastgen._dispatch import use_backend
from fastgen.ops import spread_log_likelihood as sll
from fastgen.ops import spread_noise as sn

from conftest import backends_for, has_ext_kernel, has_faiss, has_triton

F64 = torch.float64


def _opcheck(op, args):
    torch.library.opcheck(op, args)  # raises (with the failing sub-test) on a failure


# ---------------------------------------------------------------------------------------------
# gaussian_nll_loss
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends_for("gaussian_nll"))
def test_gaussian_nll_opcheck(backend):
    """opcheck on the public op fastgen::gaussian_nll_loss (what fastgen.gaussian_nll_loss calls in
    eager and compiled code) and on its internal fused ops: per-element, row and middle-broadcast
    var, a target wider than input, mixed dtypes, log_var / beta, every reduction."""
    op = torch.ops.fastgen.gaussian_nll_loss.default
    fused = torch.ops.fastgen._gaussian_nll_loss_fused.default
    bwd = torch.ops.fastgen._gaussian_nll_loss_backward.default
    # (input, target, var shapes), reduction, log_var, beta, dtypes (input, target, var)
    cases = [(((5, 6), (5, 6), (5, 6)), "mean", False, 0.0, (F64, F64, F64)),
             (((3, 4, 5), (3, 4, 5), (3, 1, 5)), "sum", True, 0.5, (F64, F64, F64)),
             (((3, 4, 5), (3, 4, 5), (3, 4, 1)), "none", False, 0.5, (F64, F64, F64)),
             (((4, 3), (2, 4, 3), (4, 1)), "none", False, 0.0, (F64, F64, F64)),
             (((6, 5), (6, 5), (6, 1)), "mean", False, 0.0, (torch.bfloat16, torch.float32, torch.float32)),
             (((24,), (24,), (24,)), "sum", False, 0.0, (torch.bfloat16,) * 3)]
    with use_backend(backend, "gaussian_nll"):
        for (xs, ts, vs), red, log_var, beta, (dx, dt, dv) in cases:
            x = torch.randn(xs, dtype=dx, requires_grad=True)
            t = torch.randn(ts, dtype=dt, requires_grad=True)
            v = (torch.randn(vs, dtype=dv) if log_var else torch.rand(vs, dtype=dv) + 0.2).requires_grad_()
            _opcheck(op, (x, t, v, True, 1e-6, red, log_var, beta, 1))
            # (the internal ops have no autograd: they run inside the public op's autograd kernel)
            if red != "none":
                _opcheck(fused, (x.detach(), t.detach(), v.detach(), False, 1e-6, red, log_var, beta, 1, True, False,
                                 True))
            else:
                go = torch.randn(torch.broadcast_shapes(xs, ts, vs), dtype=F64)
                _opcheck(bwd, (go, x.detach(), t.detach(), v.detach(), False, 1e-6, log_var, beta, True, True, True))


def test_gaussian_nll_one_op_path():
    """fastgen.gaussian_nll_loss and fastgen.nn.GaussianNLLLoss call the op fastgen::gaussian_nll_loss
    (traced with make_fx: nothing else); with inputs that need grad and a "mean" / "sum" reduction,
    its autograd kernel runs the fused forward-and-gradients op (the eager fast path)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    x, t, v = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 1) + 0.1

    def targets(fn, *a):
        return [n.target for n in make_fx(fn)(*a).graph.nodes if n.op == "call_function"]

    want = [torch.ops.fastgen.gaussian_nll_loss.default]
    assert targets(lambda x, t, v: fastgen.gaussian_nll_loss(x, t, v), x, t, v) == want
    assert targets(lambda x, t, v: fastgen.nn.GaussianNLLLoss(reduction="sum")(x, t, v), x, t, v) == want
    assert targets(lambda x, t: fastgen.gaussian_nll_loss(x, t, 0.5), x, t)[-1:] == want  # after the full()
    xg = x.clone().requires_grad_()
    got = targets(lambda x, t, v: fastgen.gaussian_nll_loss(x, t, v), xg, t, v)
    assert got[0] == torch.ops.fastgen._gaussian_nll_loss_fused.default and set(got[1:]) == {operator.getitem}, got


def test_gaussian_nll_check_var_eager():
    x, t = torch.randn(4, 3), torch.randn(4, 3)
    v = torch.rand(4, 3) + 0.1
    v[1, 2] = -1.0
    for backend in ("torch", "cpu"):
        with use_backend(backend, "gaussian_nll"):
            with pytest.raises(ValueError, match="var has negative"):
                fastgen.gaussian_nll_loss(x, t, v)
            out = fastgen.gaussian_nll_loss(x, t, v, check_var=False)  # clamped at eps, like torch without the check
        vc = v.clamp(min=1e-6)
        torch.testing.assert_close(out, (0.5 * (vc.log() + (x - t) ** 2 / vc)).mean())
    m = fastgen.nn.GaussianNLLLoss(check_var=False)
    assert "check_var=False" in repr(m)
    torch.testing.assert_close(m(x, t, v), out)


# ---------------------------------------------------------------------------------------------
# spread_noise
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends_for("spread_noise"))
def test_spread_noise_opcheck_and_custom_op_path(backend):
    """opcheck of the public op fastgen::spread_noise (the backend as its argument and through
    use_backend) and of the internal _spread_noise_grad_sigma; the op against the backend's kernel."""
    fwd = torch.ops.fastgen.spread_noise.default
    gs_op = torch.ops.fastgen._spread_noise_grad_sigma.default
    impl = {"torch": sn._TorchImpl, "cpu": sn._CppImpl, "triton": getattr(sn, "_TritonImpl", None)}[backend]
    seed = torch.tensor(987654321, dtype=torch.int64)
    with use_backend(backend, "spread_noise"):
        for kind in (0, 1):
            for sshape, dt in ((None, F64), ((1, 7), F64), ((5, 1), torch.float32), ((), torch.bfloat16),
                               ((7,), F64)):
                x = torch.randn(5, 7, dtype=dt, requires_grad=True)
                sig = 0.7 if sshape is None else (torch.rand(sshape, dtype=dt) + 0.5).requires_grad_()
                st, sf = sn._check_sigma(sig, x)
                sf = 0.0 if sf is None else sf
                _opcheck(fwd, (x, st, sf, kind, seed))
                _opcheck(fwd, (x, st, sf, kind, seed, 256, backend))
                y = fwd(x, st, sf, kind, seed)
                # the same noise as the backend's kernel for this (seed, offset 0)
                want = impl.forward(x.detach(), None if st is None else st.detach(), sf, kind, int(seed), 0)
                assert y.dtype == x.dtype and y.shape == x.shape
                torch.testing.assert_close(y, want, rtol=0, atol=0)
                if st is None:
                    continue
                _opcheck(gs_op, (torch.randn(5, 7, dtype=dt), st.detach(), kind, seed, 0, backend))
                # backward regenerates the same noise: grad_sigma = sum(eps * w) over sigma's broadcast dims
                w = torch.randn_like(x)
                gx, gs = torch.autograd.grad(y, [x, sig], w)
                torch.testing.assert_close(gx, w)
                eps = ((y.detach() - x.detach()).double() / st.detach().double())
                exp = (eps * w.double()).sum_to_size(st.shape).reshape(sig.shape)
                # (eps recovered from a bf16 y is good to ~|x| / sigma * 2^-8 per element)
                scale = (eps.abs() * w.double().abs()).sum() if dt == torch.bfloat16 else 0.0
                torch.testing.assert_close(gs.double(), exp, rtol=1e-5, atol=1e-3 + 2e-2 * float(scale))


def test_spread_noise_backward_uses_the_forward_backend():
    """The noise differs between backends: a backward run outside the forward's use_backend block
    regenerates the forward backend's noise (fast fused path and differentiable path alike)."""
    x = torch.zeros(3, 50)
    s = torch.tensor(1.0, requires_grad=True)
    with use_backend("torch", "spread_noise"):
        y = fastgen.spread_noise(x, s, generator=torch.Generator().manual_seed(4))
    other = "cpu" if has_ext_kernel("spread_noise") else "triton"
    with use_backend(other, "spread_noise"):
        (g2,) = torch.autograd.grad(y, s, y.detach(), create_graph=True, retain_graph=True)  # differentiable
        (g,) = torch.autograd.grad(y, s, y.detach())  # fused
    want = (y.detach().double() ** 2).sum().float()  # grad_sigma = sum(eps * eps) with eps = y
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g2, want, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# spread_log_likelihood
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", backends_for("spread_log_likelihood"))
def test_spread_log_likelihood_opcheck_and_custom_op_path(backend):
    fwd = torch.ops.fastgen.spread_log_likelihood.default
    bwd = torch.ops.fastgen._spread_log_likelihood_backward.default
    with use_backend(backend, "spread_log_likelihood"):
        for kind, sd, dt in ((0, 1, F64), (1, 5, F64), (0, 5, torch.float32), (1, 1, torch.float32)):
            y = (torch.randn(7, 5, dtype=dt) + 50).requires_grad_()
            x = (torch.randn(6, 5, dtype=dt) + 50).requires_grad_()
            s = (torch.rand(sd, dtype=dt) + 0.5).requires_grad_()
            _opcheck(fwd, (y, x, s, kind))
            out = fwd(y, x, s, kind)
            _opcheck(bwd, (torch.randn(7, dtype=dt), y.detach(), x.detach(), s.detach(), out.detach(), kind,
                           True, False, True))
            want = fastgen.spread_log_likelihood(y, x, s, kind=("gaussian", "laplace")[kind])
            torch.testing.assert_close(out, want, rtol=0, atol=0)
            g = torch.randn(7, dtype=dt)
            fast = torch.autograd.grad(out, [y, x, s], g, retain_graph=True)
            for a, b in zip(fast, torch.autograd.grad(want, [y, x, s], g)):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            # the differentiable backward (create_graph) agrees with the fused one
            tol = dict(rtol=1e-4, atol=1e-4) if dt == torch.float32 else {}
            for a, b in zip(torch.autograd.grad(out, [y, x, s], g, create_graph=True), fast):
                torch.testing.assert_close(a, b, **tol)


# ---------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------
def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(4, 5), torch.nn.Parameter(torch.full((5,), 0.6))


def test_fullgraph_inductor_training_step():
    """One real inductor graph: a training step calling spread_noise (learned sigma),
    spread_log_likelihood, gaussian_nll_loss, imle_loss and knn compiles without a graph break; values and
    gradients equal an eager replica that uses the same noise."""
    lin, sig = _model()
    z, data = torch.randn(6, 4), torch.randn(6, 5) + 3.0

    def step(z, data):
        x = lin(z)
        xs = fastgen.spread_noise(x, sig, kind="laplace")
        yd = fastgen.spread_noise(data, sig.detach())
        mu, lv = x[:, :3], x[:, 3:4]
        loss = -fastgen.spread_log_likelihood(yd, xs, sig).mean() + fastgen.gaussian_nll_loss(
            mu, data[:, :3], lv, log_var=True, beta=0.5) + fastgen.gaussian_nll_loss(x, data, sig.expand(6, 5).abs())
        loss = loss + fastgen.imle_loss(xs, data) + fastgen.knn(data, x, 2)[0].mean()
        return loss, x, xs, yd

    cstep = torch.compile(step, fullgraph=True, backend="inductor")
    loss, x, xs, yd = cstep(z, data)
    loss.backward()
    gw, gs = lin.weight.grad.clone(), sig.grad.clone()
    lin.weight.grad = sig.grad = None
    # eager replica with the compiled step's noise: xs = x + sig * eps
    eps = ((xs - x) / sig).detach()
    xe = lin(z)
    xse = xe + sig * eps
    mu, lv = xe[:, :3], xe[:, 3:4]
    want = -fastgen.spread_log_likelihood(yd.detach(), xse, sig).mean() + fastgen.gaussian_nll_loss(
        mu, data[:, :3], lv, log_var=True, beta=0.5) + fastgen.gaussian_nll_loss(xe, data, sig.expand(6, 5).abs())
    want = want + fastgen.imle_loss(xse, data) + fastgen.knn(data, xe, 2)[0].mean()
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, lin.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gs, sig.grad, rtol=1e-4, atol=1e-5)
    # a fresh seed per call, drawn in the graph from the default generator
    torch.manual_seed(5)
    a = cstep(z, data)[2]
    b = cstep(z, data)[2]
    torch.manual_seed(5)
    c = cstep(z, data)[2]
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def test_fullgraph_backend_chosen_at_run_time():
    """aot_eager (fake tensors + AOT autograd): the compiled graph calls the custom ops, and
    fastgen._dispatch picks the backend when they run (use_backend works on a compiled fn)."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, dtype=F64, requires_grad=True)
    t = torch.randn(5, 3, dtype=F64)
    v = (torch.rand(5, 1, dtype=F64) + 0.3).requires_grad_()
    y = torch.randn(4, 3, dtype=F64)

    def f(x, t, v):
        return fastgen.gaussian_nll_loss(x, t, v, reduction="sum") + fastgen.spread_log_likelihood(y, x, v[:1, 0]).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    for name in ("torch", "cpu", "triton"):
        if (name == "cpu" and not has_ext_kernel("gaussian_nll")) or (name == "triton" and not has_triton()):
            continue
        with use_backend(name):
            got = cf(x, t, v)
            gg = torch.autograd.grad(got, [x, v])
            want = f(x, t, v)
            gw = torch.autograd.grad(want, [x, v])
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(gg, gw):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with use_backend("faiss", "gaussian_nll"):  # chosen at run time: the compiled fn raises
        with pytest.raises(RuntimeError, match="no 'faiss' implementation"):
            cf(x, t, v)


def test_fullgraph_module_forms():
    """fastgen.nn.SpreadDivergenceLoss (learned sigma, antithetic draws) and
    fastgen.nn.GaussianNLLLoss inside one fullgraph-compiled loss (aot_eager)."""
    torch.manual_seed(0)
    spread = fastgen.nn.SpreadDivergenceLoss(torch.full((6,), 0.5), learn_sigma=True, antithetic=True)
    nll = fastgen.nn.GaussianNLLLoss(check_var=False)
    lin = torch.nn.Linear(3, 6)
    z, data = torch.randn(8, 3), torch.randn(10, 6)

    def f(z, data):
        x = lin(z)
        return spread(x, data) + nll(x, data[:8], torch.ones_like(x))

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(1)
    got = cf(z, data)
    got.backward()
    assert torch.isfinite(got) and torch.isfinite(spread.log_excess.grad).all()
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


def test_fullgraph_dynamic_shapes():
    """dynamic=True: symbolic sizes flow through the wrappers into the custom ops."""
    def f(x, t, v, y, s):
        return (fastgen.gaussian_nll_loss(x, t, v, reduction="sum") + fastgen.spread_log_likelihood(y, x, s).sum()
                + fastgen.gaussian_nll_loss(x, t, v, reduction="none").mean())

    cf = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for n in (5, 9):
        x = torch.randn(n, 3, dtype=F64, requires_grad=True)
        t, v, y = torch.randn(n, 3, dtype=F64), torch.rand(n, 1, dtype=F64) + 0.2, torch.randn(4, 3, dtype=F64)
        s = torch.full((3,), 0.7, dtype=F64, requires_grad=True)
        got, want = cf(x, t, v, y, s), f(x, t, v, y, s)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(torch.autograd.grad(got, [x, s]), torch.autograd.grad(want, [x, s])):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fullgraph_check_var():
    """Under torch.compile the negative-var check does not break the graph: on CPU it raises
    from inside the op (no sync there); check_var=False skips it."""
    x, t = torch.randn(4, 3), torch.randn(4, 3)
    v = torch.rand(4, 3) + 0.1
    v[0, 1] = -2.0
    on = torch.compile(lambda x, t, v: fastgen.gaussian_nll_loss(x, t, v), fullgraph=True, backend="eager")
    off = torch.compile(lambda x, t, v: fastgen.gaussian_nll_loss(x, t, v, check_var=False), fullgraph=True,
                        backend="eager")
    with pytest.raises(ValueError, match="var has negative"):
        on(x, t, v)
    torch.testing.assert_close(off(x, t, v), fastgen.gaussian_nll_loss(x, t, v, check_var=False))
    torch.testing.assert_close(on(x, t, v.abs()), fastgen.gaussian_nll_loss(x, t, v.abs()))


# ---------------------------------------------------------------------------------------------
# autocast and determinism
# ---------------------------------------------------------------------------------------------
def test_autocast_dtypes():
    """Under autocast a Linear gives bf16; the ops read it as it is, accumulate in float32 and
    return the documented dtypes."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 16)
    z, tgt = torch.randn(64, 8), torch.randn(64, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(z)
        mu, var = out[:, :8], out[:, 8:].float().exp()
        assert mu.dtype == torch.bfloat16
        l_mixed = fastgen.gaussian_nll_loss(mu, tgt, var)                    # promoted: float32
        l_half = fastgen.gaussian_nll_loss(mu, tgt.bfloat16(), var.bfloat16())  # bf16 in, bf16 out
        ll = fastgen.spread_log_likelihood(mu, tgt.bfloat16(), 0.8)          # float32 out
        y = fastgen.spread_noise(mu, 0.1)                                    # x's dtype
    assert l_mixed.dtype == torch.float32 and l_half.dtype == torch.bfloat16
    assert ll.dtype == torch.float32 and ll.shape == (64,) and y.dtype == torch.bfloat16
    m64, t64, v64 = mu.double(), tgt.double(), var.double()
    exact = (0.5 * (v64.log() + (m64 - t64) ** 2 / v64)).mean()
    torch.testing.assert_close(l_mixed.double(), exact, rtol=1e-5, atol=1e-6)
    vb = var.bfloat16().double()
    exact_b = (0.5 * (vb.log() + (m64 - tgt.bfloat16().double()) ** 2 / vb)).mean()
    torch.testing.assert_close(l_half.double(), exact_b, rtol=8e-3, atol=0)  # one bf16 rounding of the result
    want = fastgen.spread_log_likelihood(m64, tgt.bfloat16().double(), 0.8)
    torch.testing.assert_close(ll.double(), want, rtol=1e-5, atol=1e-4)
    # knn and imle_loss: bf16 samples from the autocast region against fp32 data
    with torch.autocast("cpu", dtype=torch.bfloat16):
        smp = lin(torch.randn(40, 8))[:, :8]
        d, i = fastgen.knn(tgt, smp, 2)
        il = fastgen.imle_loss(smp, tgt)
    assert smp.dtype == torch.bfloat16 and d.dtype == torch.float32 and i.dtype == torch.int64
    assert il.dtype == torch.bfloat16                                       # samples' dtype
    from fastgen.reference.knn import knn as ref_knn

    rd, ri = ref_knn(tgt.double(), smp.double(), 2)        # on the bf16 values, exactly
    assert torch.equal(i, ri)
    torch.testing.assert_close(d.double(), rd, rtol=2e-7, atol=1e-6)
    want_il = ((tgt.bfloat16().double() - smp.double()[ri[:, 0]]) ** 2).sum(1).mean()
    torch.testing.assert_close(il.double(), want_il, rtol=8e-3, atol=0)


def _twice(fn):
    a, b = fn(), fn()
    for p, q in zip(a, b):
        assert torch.equal(p, q), "not bitwise reproducible"


@pytest.mark.parametrize("backend", backends_for("gaussian_nll"))
def test_deterministic_bitwise(backend):
    """torch.use_deterministic_algorithms(True): every op gives bitwise the same values and
    gradients on a second run (sizes big enough to split the CPU kernels across threads)."""
    torch.manual_seed(0)
    R, C, N, S = (8, 40, 20, 15) if backend == "triton" else (64, 300, 200, 150)  # (the interpreter is slow)
    x = torch.randn(R, C, requires_grad=True)
    t = torch.randn(R, C)
    v = (torch.rand(R, 1) + 0.2).requires_grad_()
    y, smp = torch.randn(N, 16) + 20, (torch.randn(S, 16) + 20).requires_grad_()
    s = torch.full((16,), 0.9, requires_grad=True)

    def run():
        with use_backend(backend):
            out = [fastgen.gaussian_nll_loss(x, t, v, reduction=r) for r in ("mean", "none")]
            out += list(torch.autograd.grad(out[0] + out[1].sum(), [x, v]))
            ll = fastgen.spread_log_likelihood(y, smp, s)
            out += [ll] + list(torch.autograd.grad(ll.sum(), [smp, s]))
            g = torch.Generator().manual_seed(3)
            yn = fastgen.spread_noise(x, s[:1], generator=g)
            out += [yn] + list(torch.autograd.grad(yn.sum(), [s]))
            dk, ik = fastgen.knn(y, smp, 3)
            out += [dk, ik] + list(torch.autograd.grad(dk.sum(), [smp]))
            return out

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _twice(run)
    finally:
        torch.use_deterministic_algorithms(prev)


# ---------------------------------------------------------------------------------------------
# GPU: CUDA graphs and host syncs
# ---------------------------------------------------------------------------------------------
def _gpu_inputs():
    torch.manual_seed(0)
    dev = "cuda"
    x = torch.randn(256, 64, device=dev, requires_grad=True)
    t = torch.randn(256, 64, device=dev)
    v = (torch.rand(256, 64, device=dev) + 0.1).requires_grad_()
    smp = torch.randn(300, 64, device=dev, requires_grad=True)
    return x, t, v, smp


def _gpu_step(x, t, v, smp):
    l1 = fastgen.gaussian_nll_loss(x, t, v, check_var=False)
    l2 = fastgen.gaussian_nll_loss(x, t, v.log(), log_var=True, reduction="none").sum()
    l3 = -fastgen.spread_log_likelihood(fastgen.spread_noise(t, 0.3), smp, 0.7).mean()
    loss = l1 + l2 + l3
    return (loss,) + torch.autograd.grad(loss, [x, v, smp])


def _capture(step, seed=None):
    """Warm ``step`` up on a side stream (Triton compiles, the extension loads), then capture it
    in a CUDA graph; returns (graph, the static outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    if seed is not None:
        torch.manual_seed(seed)
    with torch.cuda.graph(graph):
        static = step()
    return graph, static


@pytest.mark.gpu
def test_gpu_no_host_sync():
    args = _gpu_inputs()
    _gpu_step(*args)  # warm-up: Triton compiles, the extension loads
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _gpu_step(*args)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    """Forward and backward of gaussian_nll_loss (check_var=False, log_var), spread_noise and
    spread_log_likelihood captured in one CUDA graph; replays match eager (spread_noise's seed is
    drawn when captured, so the replay repeats that noise: compare with the same seed)."""
    args = _gpu_inputs()
    graph, static = _capture(lambda: _gpu_step(*args), seed=11)
    with torch.no_grad():
        args[0].add_(0.01)  # new input values, same buffers
    graph.replay()
    torch.manual_seed(11)
    want = _gpu_step(*args)
    for a, b in zip(static, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_gpu_compiled_fullgraph_no_sync():
    args = _gpu_inputs()
    cf = torch.compile(lambda x, t, v, smp: fastgen.gaussian_nll_loss(x, t, v, check_var=False)
                       - fastgen.spread_log_likelihood(t, smp, 0.7).mean(), fullgraph=True)
    out = cf(*args)
    out.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        cf(*args).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(out, fastgen.gaussian_nll_loss(*args[:3]) - fastgen.spread_log_likelihood(
        args[1], args[3], 0.7).mean(), rtol=1e-4, atol=1e-4)
    v = args[2].detach().clone()
    v[0, 0] = -1.0  # under compile on GPU a negative var gives NaN instead of a host sync
    ck = torch.compile(lambda x, t, v: fastgen.gaussian_nll_loss(x, t, v), fullgraph=True)
    assert torch.isnan(ck(args[0].detach(), args[1], v))


# ---------------------------------------------------------------------------------------------
# knn
# ---------------------------------------------------------------------------------------------
KNN_BACKENDS = backends_for("knn") + [pytest.param("faiss", marks=pytest.mark.skipif(not has_faiss(),
                                                                                        reason="faiss not installed"))]


@pytest.mark.parametrize("backend", KNN_BACKENDS)
def test_knn_opcheck_and_custom_op_path(backend):
    op = torch.ops.fastgen.knn.default
    q = (torch.randn(2, 7, 5, dtype=F64) + 100.0).requires_grad_()
    key = (torch.randn(2, 11, 5, dtype=F64) + 100.0)
    key[:, 3] = key[:, 8]  # duplicate keys: ties go to the lowest index
    key.requires_grad_()
    for k in ((3,) if backend == "triton" else (1, 3)):  # (the Triton interpreter is slow)
        _opcheck(op, (q, key, k, backend))
        d, i = op(q, key, k, backend)
        dw, iw = fastgen.knn(q, key, k, backend=backend)
        assert d.dtype == F64 and i.dtype == torch.int64
        assert torch.equal(i, iw)
        torch.testing.assert_close(d, dw, rtol=0, atol=0)
        g = torch.rand_like(d)
        for a, b in zip(torch.autograd.grad(d, [q, key], g), torch.autograd.grad(dw, [q, key], g)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    qf = torch.randn(1, 4, 6, dtype=torch.bfloat16)
    if backend != "triton":
        _opcheck(op, (qf, torch.randn(1, 9, 6, dtype=torch.bfloat16), 2, backend))
    assert op(qf, qf, 1, backend)[0].dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    not has_ext_kernel("knn"), reason="fastgen._C not built"))])
def test_imle_nearest_opcheck(backend):
    op = torch.ops.fastgen.imle_nearest.default
    x, s = torch.randn(2, 6, 4), torch.randn(2, 9, 4)
    for r in (0.0, 1.5):
        _opcheck(op, (x, s, r, backend))
        idx, found = op(x, s, r, backend)
        assert idx.dtype == torch.int64 and found.dtype == torch.bool and idx.shape == (2, 6)
    with pytest.raises(ValueError, match="data"):
        bad = x.clone()
        bad[0, 0, 0] = float("nan")
        op(bad, s, 0.0, backend)


def test_fullgraph_knn_imle_step():
    """knn (2-D and batched, forward and gradient) and imle_loss (plain, conditional, RS-IMLE)
    in one fullgraph-compiled step (aot_eager); values and gradients equal eager."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).double()
    z, data = torch.randn(10, 3, dtype=F64), torch.randn(6, 4, dtype=F64)

    def f(z, data):
        x = lin(z)
        d2, idx = fastgen.knn(data, x, 2)
        d1, _ = fastgen.knn(x.reshape(2, 5, 4), data.reshape(2, 3, 4), 1)    # batched
        return (fastgen.imle_loss(x, data) + fastgen.imle_loss(x, data, rejection_radius=0.5, reduction="sum")
                + fastgen.imle_loss(x.reshape(2, 5, 4), data[:2], conditional=True) + d2.sum() + d1.mean()
                + idx.sum() * 0)

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = cf(z, data)
    gg = torch.autograd.grad(got, [lin.weight])
    want = f(z, data)
    gw = torch.autograd.grad(want, [lin.weight])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gg[0], gw[0], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# CUDA-graph capture path of knn / imle_loss (no host read: NaN instead of ValueError)
# ---------------------------------------------------------------------------------------------
def test_capture_path_poisons_nonfinite_rows(monkeypatch):
    """While a CUDA graph is captured the NaN / inf check cannot read the device: knn gives NaN
    dist2 for the rows whose result is undefined and imle_loss a NaN loss; finite rows are
    unchanged. (Simulated on CPU with the torch backend; the GPU test captures for real.)"""
    import fastgen._validate as V
    import fastgen.ops.imle_loss as il

    torch.manual_seed(0)
    q, key = torch.randn(2, 5, 3), torch.randn(2, 7, 3)
    want_d, want_i = fastgen.knn(q, key, 2, backend="torch")
    want_l = fastgen.imle_loss(key, q, conditional=True, reduction="none", backend="torch")
    q[0, 1, 2] = float("nan")
    key[1, 4, 0] = float("inf")
    with pytest.raises(ValueError, match="query"):
        fastgen.knn(q, key, 2, backend="torch")
    monkeypatch.setattr(V, "capturing", lambda x: True)
    monkeypatch.setattr(il, "capturing", lambda x: True)
    d, i = fastgen.knn(q, key, 2, backend="torch")
    assert torch.isnan(d[0, 1]).all() and torch.isnan(d[1]).all()
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[0, 1] = False
    keep[1] = False
    assert torch.equal(d[keep], want_d[keep]) and torch.equal(i[keep], want_i[keep])
    loss = fastgen.imle_loss(key, q, conditional=True, reduction="none", backend="torch")
    assert torch.isnan(loss[~keep]).all() and torch.equal(loss[keep], want_l[keep])
    with pytest.raises(RuntimeError, match="RS-IMLE"):
        fastgen.imle_loss(key, q, conditional=True, rejection_radius=0.1, backend="torch")


@pytest.mark.gpu
def test_gpu_cuda_graph_knn_imle_loss():
    """knn (Triton: the exact tiers run over every row while capturing, no host read) and
    imle_loss forward + backward captured in one CUDA graph on clustered data offset by 1e3;
    replays on new values equal eager, exactly in the neighbours."""
    torch.manual_seed(0)
    dev = "cuda"
    centres = torch.randn(4, 32, device=dev)
    data = centres[torch.randint(0, 4, (300,), device=dev)] + 1e-2 * torch.randn(300, 32, device=dev) + 1e3
    smp = (data[torch.randint(0, 300, (700,), device=dev)] + 1e-2 * torch.randn(700, 32, device=dev)).requires_grad_()

    def step():
        d, i = fastgen.knn(data, smp, 4)
        loss = fastgen.imle_loss(smp, data) + d.mean()
        return (loss, d, i) + torch.autograd.grad(loss, [smp])

    graph, static = _capture(step)
    with torch.no_grad():
        smp.add_(1e-2 * torch.randn_like(smp))
    graph.replay()
    want = step()
    assert torch.equal(static[2], want[2])
    for a, b in zip(static, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        data[3, 5] = float("nan")
    graph.replay()
    assert torch.isnan(static[1][3]).all() and torch.isnan(static[0])


@pytest.mark.parametrize("backend", KNN_BACKENDS)
def test_deterministic_knn_imle_loss(backend):
    """torch.use_deterministic_algorithms(True): knn (ties on duplicated keys) and imle_loss
    (plain, RS-IMLE, conditional) give bitwise the same values, indices and gradients twice,
    on every knn backend."""
    torch.manual_seed(0)
    n, m = (12, 30) if backend == "triton" else (200, 600)
    data = torch.randn(n, 8) + 50.0
    smp = torch.randn(m, 8) + 50.0
    smp[m // 2:] = smp[: m - m // 2]  # every sample duplicated: ties everywhere
    smp.requires_grad_()

    def run():
        d, i = fastgen.knn(data, smp, 3, backend=backend)
        loss = (fastgen.imle_loss(smp, data, backend=backend)
                + fastgen.imle_loss(smp, data, rejection_radius=1.0, backend=backend)
                + fastgen.imle_loss(smp.reshape(2, m // 2, 8), data[:2], conditional=True, backend=backend))
        return [d, i, loss] + list(torch.autograd.grad(loss + d.sum(), [smp]))

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        _twice(run)
        d, i = run()[:2]
        assert bool((i[:, 0] < m // 2).all())  # ties -> the lowest index
    finally:
        torch.use_deterministic_algorithms(prev)
