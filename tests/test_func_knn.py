"""fastgen.knn as a torch.func citizen (issue 12): the one op ``fastgen::knn`` with its autograd
(double backward, forward-mode AD, forward-over-reverse) and vmap rule, on every backend here.

All in float64 on small shapes, on data where a 1e-6 perturbation cannot change the neighbours
(``separated`` asserts a gap between consecutive neighbour distances), so that dist2 is smooth
and torch's numerical checks are meaningful. The "reference" derivatives are those of the
plain-torch expression ||q - key[idx]||^2 with idx from fastgen.reference.knn.
"""
import pytest
import torch
import torch.func as tf
from torch.autograd import gradcheck, gradgradcheck

import fastgen
from fastgen import _dispatch
from fastgen.reference.knn import knn as ref_knn, neighbour_dist2
from conftest import GRAD_FLAGS, TRITON, knn_backends

F64 = torch.float64
BACKENDS = knn_backends()
# TRITON: the interpreter on CPU (~0.5 s a call): fast-mode checks on tiny shapes only


def separated(q_shape, k_shape, k, seed, gap=1e-3):
    """float64 query / key whose k + 1 nearest distances (per query) differ by > gap: moving any
    point by 1e-6 cannot change the k neighbours or their order. (The first seed from ``seed``
    on whose draw has the gap: deterministic.) A 2-D key with a 3-D query is shared by every
    query set."""
    for s in range(seed, seed + 1000, 7):
        g = torch.Generator().manual_seed(s)
        q = torch.randn(*q_shape, generator=g, dtype=F64)
        key = 2.0 * torch.randn(*k_shape, generator=g, dtype=F64)
        kb = key.expand(q.shape[0], *key.shape) if key.dim() < q.dim() else key
        d, _ = ref_knn(q, kb, min(k + 1, key.shape[-2]))
        if float((d[..., 1:] - d[..., :-1]).min()) > gap:
            return q, key
    raise AssertionError("no separated draw found")


def ref_dist2(q, key, k):
    """||q - key[idx]||^2 with idx from the float64 brute force: plain torch (differentiable)."""
    d = ref_knn(q, key, k)[0]
    torch.testing.assert_close(d, neighbour_dist2(q, key, ref_knn(q, key, k)[1]), rtol=0, atol=0)
    return d


def d2(backend, k):
    return lambda q, key: fastgen.knn(q, key, k, backend=backend)[0]


# ------------------------------------------------------------------------------- autograd checks
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batched", [False, True])
def test_gradcheck_and_gradgradcheck(backend, batched):
    q, key = separated((2, 4, 3) if batched else (5, 3), (2, 9, 3) if batched else (9, 3), 3, seed=1)
    q.requires_grad_()
    key.requires_grad_()
    for k in (1, 3):
        assert gradcheck(d2(backend, k), (q, key), **GRAD_FLAGS)
        assert gradgradcheck(d2(backend, k), (q, key), check_fwd_over_rev=True, check_batched_grad=True)
    # one input differentiable only (needs_input_grad), and the index output has no gradient
    assert gradgradcheck(lambda a: fastgen.knn(a, key.detach(), 2, backend=backend)[0], (q,), check_fwd_over_rev=True)
    d, i = fastgen.knn(q, key, 2, backend=backend)
    assert d.requires_grad and not i.requires_grad


@pytest.mark.parametrize("backend", [TRITON])
def test_gradcheck_triton_fast_mode(backend):
    q, key = separated((1, 2, 2), (1, 5, 2), 2, seed=0)
    q.requires_grad_()
    key.requires_grad_()
    assert gradcheck(d2(backend, 2), (q, key), fast_mode=True, **GRAD_FLAGS)
    assert gradgradcheck(d2(backend, 2), (q, key), fast_mode=True, check_fwd_over_rev=True)


def test_double_backward_not_zero():
    """The second derivative is the real one (2 I w.r.t. the query, per neighbour), not zero."""
    q, key = separated((4, 3), (10, 3), 2, seed=2)
    q.requires_grad_()
    gq, = torch.autograd.grad(fastgen.knn(q, key, 2)[0].sum(), q, create_graph=True)
    hvp, = torch.autograd.grad(gq, q, torch.ones_like(gq))
    torch.testing.assert_close(hvp, torch.full_like(q, 4.0))  # 2 * k


def test_forward_ad_matches_reference():
    import torch.autograd.forward_ad as fwAD

    q, key = separated((3, 5, 4), (3, 12, 4), 3, seed=3)
    tq, tk = torch.randn_like(q), torch.randn_like(key)
    with fwAD.dual_level():
        d = fastgen.knn(fwAD.make_dual(q, tq), fwAD.make_dual(key, tk), 3)[0]
        got = fwAD.unpack_dual(d).tangent
    _, want = tf.jvp(lambda a, b: ref_dist2(a, b, 3), (q, key), (tq, tk))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batched", [False, True])
def test_jacrev_jacfwd_hessian_match_reference(backend, batched):
    q, key = separated((2, 3, 2) if batched else (4, 2), (2, 7, 2) if batched else (9, 2), 2, seed=4)
    f, r = d2(backend, 2), (lambda a, b: ref_dist2(a, b, 2))
    for jac in (tf.jacrev, tf.jacfwd):
        got = jac(f, argnums=(0, 1))(q, key)
        want = jac(r, argnums=(0, 1))(q, key)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)
    w = torch.randn(q.shape[:-1] + (2,), dtype=F64)
    got = tf.hessian(lambda a, b: (f(a, b) * w).sum(), argnums=(0, 1))(q, key)
    want = tf.hessian(lambda a, b: (r(a, b) * w).sum(), argnums=(0, 1))(q, key)
    for ga, wa in zip(got, want):
        for a, b in zip(ga, wa):
            torch.testing.assert_close(a, b)
    # reverse-over-reverse, and grad of a function of the output under an outer transform
    g2 = tf.jacrev(tf.grad(lambda a, b: (f(a, b) * w).sum()))(q, key)
    torch.testing.assert_close(g2, tf.jacrev(tf.grad(lambda a, b: (r(a, b) * w).sum()))(q, key))
    g3 = tf.jacfwd(tf.grad(lambda a, b: f(a, b).pow(2).sum(), argnums=1), argnums=0)(q, key)
    torch.testing.assert_close(g3, tf.jacfwd(tf.grad(lambda a, b: r(a, b).pow(2).sum(), argnums=1), argnums=0)(q, key))


# ------------------------------------------------------------------------------- vmap
def _loop(fn, *args, in_dims):
    V = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    outs = [fn(*[a if d is None else a.select(d, v) for a, d in zip(args, in_dims)]) for v in range(V)]
    return tuple(torch.stack(o) for o in zip(*outs))


@pytest.fixture
def count_searches(monkeypatch):
    """Records the (query, key) shapes of every backend call (fastgen._dispatch.run)."""
    seen = []
    run = _dispatch.run

    def spy(op, args, **kw):
        if op == "knn":
            seen.append((tuple(args[0].shape), tuple(args[1].shape)))
        return run(op, args, **kw)

    monkeypatch.setattr(_dispatch, "run", spy)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["2d-q", "2d-key", "2d-both", "3d-q", "3d-key", "3d-both", "3d-q-dim1"])
def test_vmap_matches_loop_in_one_search(backend, case, count_searches):
    """vmap over query and / or key, 2-D and 3-D, equals a Python loop exactly (indices and
    dist2), in ONE backend call of the folded shape (key not copied when only query is mapped)."""
    torch.manual_seed(5)
    V, B, N, M, D, k = 4, 3, 6, 20, 5, 3
    three = case.startswith("3d")
    lead = (B,) if three else ()
    q = torch.randn(V, *lead, N, D)
    key = torch.randn(V, *lead, M, D)
    key[:, ..., 7, :] = key[:, ..., 2, :]      # duplicate keys: ties -> lowest index, in both
    if case.endswith("dim1"):
        q = q.movedim(0, 1).contiguous()      # the vmapped dim in the middle
    dims = {"2d-q": (0, None), "2d-key": (None, 0), "2d-both": (0, 0), "3d-q": (0, None),
            "3d-key": (None, 0), "3d-both": (0, 0), "3d-q-dim1": (1, None)}[case]
    args = (q if dims[0] is not None else q[0], key if dims[1] is not None else key[0])
    fn = lambda a, b: fastgen.knn(a, b, k, backend=backend)  # noqa: E731
    got = tf.vmap(fn, in_dims=dims)(*args)
    count_searches.clear()
    want = _loop(fn, *args, in_dims=dims)
    assert len(count_searches) == V
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    count_searches.clear()
    tf.vmap(fn, in_dims=dims)(*args)
    Bk = B if three else 1
    if dims[1] is None:  # V folded into the query rows; key passed as is
        assert count_searches == [((Bk, V * N, D), (Bk, M, D))]
    else:                # V folded into the batch
        assert count_searches == [((V * Bk, N, D), (V * Bk, M, D))]


@pytest.mark.parametrize("backend", [TRITON])
def test_vmap_triton(backend):
    torch.manual_seed(6)
    q, key = torch.randn(2, 3, 4), torch.randn(2, 9, 4)
    fn = lambda a, b: fastgen.knn(a, b, 2, backend=backend)  # noqa: E731
    got = tf.vmap(fn)(q, key)
    want = _loop(fn, q, key, in_dims=(0, 0))
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_vmap_nested_and_size_one():
    """vmap of vmap (both levels folded into the one search), and a vmapped dim of size 1."""
    torch.manual_seed(7)
    q, key = torch.randn(2, 3, 5, 4), torch.randn(3, 11, 4)
    fn = lambda a, b: fastgen.knn(a, b, 2)  # noqa: E731
    got = tf.vmap(tf.vmap(fn, in_dims=(0, 0)), in_dims=(0, None))(q, key)
    want_d, want_i = fastgen.knn(q.reshape(6, 5, 4), key.repeat(2, 1, 1), 2)
    assert torch.equal(got[1], want_i.view(2, 3, 5, 2)) and torch.equal(got[0], want_d.view(2, 3, 5, 2))
    got = tf.vmap(fn, in_dims=(0, None))(q[:1, 0], key[0])
    assert torch.equal(got[1][0], fastgen.knn(q[0, 0], key[0], 2)[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients(backend):
    """vmap(grad) over examples (each its own query set against one shared, learnable key set)
    equals a loop of torch.autograd.grad; the backward runs vmapped, not looped."""
    V, N, M, D = 5, 4, 12, 3
    q, key = separated((V, N, D), (M, D), 2, seed=8)
    w = torch.randn(V, N, 2, dtype=F64)

    def loss(qv, keyv, wv):
        return (fastgen.knn(qv, keyv, 2, backend=backend)[0] * wv).sum()

    got = tf.vmap(tf.grad(loss, argnums=(0, 1)), in_dims=(0, None, 0))(q, key, w)
    for v in range(V):
        qv, kv = q[v].clone().requires_grad_(), key.clone().requires_grad_()
        want = torch.autograd.grad(loss(qv, kv, w[v]), [qv, kv])
        ref = torch.autograd.grad((ref_dist2(qv, kv, 2) * w[v]).sum(), [qv, kv])
        for a, b, c in zip(got, want, ref):
            torch.testing.assert_close(a[v], b)
            torch.testing.assert_close(a[v], c)


# ------------------------------------------------------------------------------- op and compile
@pytest.mark.parametrize("backend", BACKENDS + [TRITON])
def test_public_function_calls_the_one_op(backend, monkeypatch):
    """fastgen.knn (2-D and 3-D) goes through torch.ops.fastgen.knn, eager as compiled."""
    import fastgen.ops.knn as K

    calls = []
    op = K._knn_op

    def spy(*a):
        calls.append(tuple(a[0].shape))
        return op(*a)

    monkeypatch.setattr(K, "_knn_op", spy)
    q, key = torch.randn(3, 4), torch.randn(8, 4)
    fastgen.knn(q, key, 2, backend=backend)
    fastgen.knn(q[None], key[None], 2, backend=backend)
    assert calls == [(1, 3, 4), (1, 3, 4)]
    assert not hasattr(torch.ops.fastgen, "knn_op")  # the old second path is gone


@pytest.mark.parametrize("batched", [False, True])
def test_compile_fullgraph_forward_backward(batched):
    """torch.compile(fullgraph=True) of a step with knn, forward and backward (w.r.t. query and
    key), equals eager."""
    torch._dynamo.reset()
    q, key = separated((2, 5, 3) if batched else (5, 3), (2, 13, 3) if batched else (13, 3), 3, seed=9)

    def step(a, b):
        d, i = fastgen.knn(a, b, 3)
        return (d * torch.linspace(0.5, 1.5, 3, dtype=F64)).sum() + i.sum() * 0

    cf = torch.compile(step, fullgraph=True, backend="aot_eager")
    for f in (cf, step):
        a, b = q.clone().requires_grad_(), key.clone().requires_grad_()
        out = f(a, b)
        out.backward()
        if f is cf:
            got = (out, a.grad, b.grad)
        else:
            for x, y in zip(got, (out, a.grad, b.grad)):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
