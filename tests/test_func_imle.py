"""fastgen.imle_loss as a torch.func citizen (issue 12): double backward, forward-mode AD,
forward-over-reverse, vmap (onto the search's batch: one call) and per-sample gradients, for
plain, conditional and RS-IMLE; the op fastgen::imle_nearest (opcheck, every backend).

float64 on small shapes, on data where a 1e-6 perturbation cannot change the picked sample
(``separated`` asserts a gap between the nearest and second-nearest eligible distances, and
between every distance and the RS-IMLE radius). The reference is fastgen.reference.imle_loss
(float64 brute force, plain torch: differentiable).
"""
import pytest
import torch
import torch.func as tf
from torch.autograd import gradcheck, gradgradcheck

import fastgen
import fastgen.ops.imle_loss as il
from fastgen.reference import imle_loss as ref
from conftest import GRAD_FLAGS, TRITON, knn_backends

F64 = torch.float64
BACKENDS = knn_backends()
RADIUS = 1.5

# (name, samples shape, data shape, kwargs)
CASES = [
    ("plain", (9, 3), (5, 3), {}),
    ("image", (9, 2, 2), (4, 2, 2), {"reduction": "sum"}),
    ("none", (8, 3), (5, 3), {"reduction": "none"}),
    ("conditional", (2, 7, 3), (2, 4, 3), {"conditional": True}),
    ("conditional-one", (3, 6, 3), (3, 3), {"conditional": True, "reduction": "none"}),
    ("rs", (12, 2), (5, 2), {"rejection_radius": RADIUS}),
    ("rs-conditional", (2, 10, 2), (2, 4, 2), {"conditional": True, "rejection_radius": RADIUS, "reduction": "sum"}),
]


def _pairs(samples, data, conditional):
    """squared distances [B, N, S] in float64 (the reference's layout)."""
    if conditional:
        B = samples.shape[0]
        s = samples.reshape(B, samples.shape[1], -1)
        x = data.reshape(B, -1, s.shape[-1])       # [B, N, ...] or [B, ...] (N = 1)
    else:
        x, s = data.reshape(1, data.shape[0], -1), samples.reshape(1, samples.shape[0], -1)
    return ((x[:, :, None, :] - s[:, None, :, :]) ** 2).sum(-1)


def separated(s_shape, x_shape, kw, seed, gap=1e-3):
    """float64 samples / data (the first draw from ``seed`` on) where the nearest eligible
    sample of every example beats the next one by > gap and no distance is within gap of the
    RS-IMLE radius (so neither the pick nor the rejection set moves under a 1e-6 change);
    RS-IMLE draws must also reject something, so that the radius matters."""
    r2 = kw.get("rejection_radius", 0.0) ** 2
    for s in range(seed, seed + 5000, 7):
        g = torch.Generator().manual_seed(s)
        samples = 1.5 * torch.randn(*s_shape, generator=g, dtype=F64)
        data = torch.randn(*x_shape, generator=g, dtype=F64)
        d = _pairs(samples, data, kw.get("conditional", False))
        if r2 > 0:
            if float((d - r2).abs().min()) <= gap or not bool((d < r2).any()):
                continue
            d = torch.where(d < r2, torch.full_like(d, float("inf")), d)
        top = d.topk(2, dim=-1, largest=False).values
        if float((top[..., 1] - top[..., 0]).min()) > gap:
            return samples, data
    raise AssertionError("no separated draw found")


def case_args(name, seed=0):
    _, s_shape, x_shape, kw = next(c for c in CASES if c[0] == name)
    s, x = separated(s_shape, x_shape, kw, seed)
    return s, x, kw


# ------------------------------------------------------------------------------- autograd checks
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_gradcheck_and_gradgradcheck(name):
    s, x, kw = case_args(name)
    s.requires_grad_()
    f = lambda a: fastgen.imle_loss(a, x, **kw)  # noqa: E731
    assert gradcheck(f, (s,), **GRAD_FLAGS)
    assert gradgradcheck(f, (s,), check_fwd_over_rev=True, check_batched_grad=True)


@pytest.mark.parametrize("backend", BACKENDS + [TRITON])
def test_gradcheck_every_backend(backend):
    s, x, kw = case_args("rs-conditional" if backend != "triton" else "plain")
    s.requires_grad_()
    f = lambda a: fastgen.imle_loss(a, x, backend=backend, **kw)  # noqa: E731
    assert gradcheck(f, (s,), fast_mode=backend == "triton", **GRAD_FLAGS)


@pytest.mark.parametrize("name", ["plain", "conditional-one", "rs", "rs-conditional"])
def test_jacrev_jacfwd_hessian_match_reference(name):
    s, x, kw = case_args(name, seed=1)
    red = dict(kw, reduction="none")
    f = lambda a: fastgen.imle_loss(a, x, **red)  # noqa: E731
    r = lambda a: ref.imle_loss(a, x, **red)  # noqa: E731
    torch.testing.assert_close(tf.jacrev(f)(s), tf.jacrev(r)(s))
    torch.testing.assert_close(tf.jacfwd(f)(s), tf.jacfwd(r)(s))
    torch.testing.assert_close(tf.hessian(lambda a: fastgen.imle_loss(a, x, **kw))(s),
                               tf.hessian(lambda a: ref.imle_loss(a, x, **kw))(s))
    torch.testing.assert_close(tf.jacrev(tf.grad(lambda a: fastgen.imle_loss(a, x, **red).pow(2).sum()))(s),
                               tf.jacrev(tf.grad(lambda a: ref.imle_loss(a, x, **red).pow(2).sum()))(s))


def test_forward_ad_and_double_backward_match_reference():
    import torch.autograd.forward_ad as fwAD

    s, x, kw = case_args("rs-conditional", seed=2)
    t = torch.randn_like(s)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(fastgen.imle_loss(fwAD.make_dual(s, t), x, **kw)).tangent
    _, want = tf.jvp(lambda a: ref.imle_loss(a, x, **kw), (s,), (t,))
    torch.testing.assert_close(got, want)
    # double backward is the real one (not zero): H v for the sum reduction is 2 v on the picked rows
    a = s.clone().requires_grad_()
    g, = torch.autograd.grad(fastgen.imle_loss(a, x, **kw), a, create_graph=True)
    hv, = torch.autograd.grad(g, a, t)
    b = s.clone().requires_grad_()
    gr, = torch.autograd.grad(ref.imle_loss(b, x, **kw), b, create_graph=True)
    want, = torch.autograd.grad(gr, b, t)
    assert hv.abs().sum() > 0
    torch.testing.assert_close(hv, want)


# ------------------------------------------------------------------------------- vmap
@pytest.fixture
def count_searches(monkeypatch):
    """Records the (data, samples) shapes of each search (nearest_eligible, inside the op)."""
    seen = []
    real = il.nearest_eligible

    def spy(data, samples, *a, **kw):
        seen.append((tuple(data.shape), tuple(samples.shape)))
        return real(data, samples, *a, **kw)

    monkeypatch.setattr(il, "nearest_eligible", spy)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["plain", "image", "conditional", "conditional-one", "rs", "rs-conditional"])
@pytest.mark.parametrize("mapped", ["samples", "data", "both"])
def test_vmap_matches_loop_in_one_search(backend, name, mapped, count_searches):
    _, s_shape, x_shape, kw = next(c for c in CASES if c[0] == name)
    V = 3
    g = torch.Generator().manual_seed(4)
    S = torch.randn(V, *s_shape, generator=g)
    X = torch.randn(V, *x_shape, generator=g)
    dims = {"samples": (0, None), "data": (None, 0), "both": (0, 0)}[mapped]
    args = (S if dims[0] is not None else S[0], X if dims[1] is not None else X[0])
    kw = dict(kw, reduction="none", backend=backend)
    f = lambda a, b: fastgen.imle_loss(a, b, **kw)  # noqa: E731
    got = tf.vmap(f, in_dims=dims)(*args)
    want = torch.stack([f(*[a if d is None else a[v] for a, d in zip(args, dims)]) for v in range(V)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    count_searches.clear()
    tf.vmap(f, in_dims=dims)(*args)
    # one search (RS-IMLE's first search is the whole batch; it may widen for pending rows)
    B = s_shape[0] if kw.get("conditional") else 1
    N = (x_shape[1] if len(x_shape) == len(s_shape) else 1) if kw.get("conditional") else x_shape[0]
    D = torch.Size(s_shape[2:] if kw.get("conditional") else s_shape[1:]).numel()
    Sn = s_shape[1] if kw.get("conditional") else s_shape[0]
    assert len(count_searches) == 1 or (kw.get("rejection_radius") and len(count_searches) > 1)
    if dims[0] is None:   # samples shared: V folds into the examples
        assert count_searches[0] == ((B, V * N, D), (B, Sn, D))
    else:                 # V folds into the condition batch
        assert count_searches[0] == ((V * B, N, D), (V * B, Sn, D))


@pytest.mark.parametrize("name", ["plain", "conditional", "rs"])
def test_per_sample_gradients(name):
    """vmap(grad) over independent (samples, data) problems equals a loop of autograd.grad and
    the reference's gradients."""
    V = 4
    per = [case_args(name, seed=10 + v) for v in range(V)]
    S = torch.stack([p[0] for p in per])
    X = torch.stack([p[1] for p in per])
    kw = per[0][2]
    got = tf.vmap(tf.grad(lambda a, b: fastgen.imle_loss(a, b, **kw)))(S, X)
    for v in range(V):
        a = S[v].clone().requires_grad_()
        want, = torch.autograd.grad(fastgen.imle_loss(a, X[v], **kw), a)
        b = S[v].clone().requires_grad_()
        want_ref, = torch.autograd.grad(ref.imle_loss(b, X[v], **kw), b)
        torch.testing.assert_close(got[v], want)
        torch.testing.assert_close(got[v], want_ref)


# ------------------------------------------------------------------------------- the op
def test_imle_loss_calls_the_one_op(monkeypatch):
    calls = []
    real = il._op_nearest

    def spy(*a):
        calls.append(tuple(a[0].shape))
        return real(*a)

    monkeypatch.setattr(il, "_op_nearest", spy)
    fastgen.imle_loss(torch.randn(9, 3), torch.randn(4, 3))
    fastgen.imle_loss(torch.randn(2, 9, 3), torch.randn(2, 3), conditional=True, rejection_radius=0.5)
    assert calls == [(1, 4, 3), (2, 1, 3)]


@pytest.mark.parametrize("backend", BACKENDS + [TRITON])
def test_imle_nearest_opcheck_every_backend(backend):
    op = torch.ops.fastgen.imle_nearest.default
    g = torch.Generator().manual_seed(5)
    x, s = torch.randn(2, 5, 3, generator=g, dtype=F64), torch.randn(2, 8, 3, generator=g, dtype=F64)
    for r in ((0.0,) if backend == "triton" else (0.0, 1.0)):
        torch.library.opcheck(op, (x, s, r, backend))
        idx, found = op(x, s, r, backend)
        _, ridx, rfound = ref.nearest_eligible(x, s, r)
        assert torch.equal(idx, ridx) and torch.equal(found, rfound)
