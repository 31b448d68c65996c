"""imle_loss, nn.IMLELoss, imle.select_latents and imle.IMLESampler against brute force
(fastgen/reference/imle_loss.py) on tiny data."""
import pytest
import torch

import fastgen
from fastgen.ops.imle_loss import nearest_eligible
from fastgen.reference import imle_loss as ref


def _close(a, b, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


def _clustered(n, d, offset=1e3, clusters=3, spread=0.5, g=None):
    c = torch.randn(clusters, d, generator=g) * 5 + offset
    return c[torch.randint(0, clusters, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)


def _ref_grad(samples, data, **kw):
    s = samples.detach().double().requires_grad_(True)
    ref.imle_loss(s, data.double(), **kw).backward()
    return s.grad


# ----------------------------------------------------------------------------- imle_loss
@pytest.mark.parametrize("shape", [(7,), (3, 5), (1,), (2, 2, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_imle_loss_matches_brute_force(shape, reduction):
    s = torch.randn(37, *shape, requires_grad=True)
    x = torch.randn(53, *shape)
    out = fastgen.imle_loss(s, x, reduction=reduction)
    want = ref.imle_loss(s.detach(), x, reduction=reduction)
    assert out.dtype == torch.float32 and out.shape == want.shape
    _close(out, want)
    out.sum().backward()
    g = s.detach().double().requires_grad_(True)
    ref.imle_loss(g, x.double(), reduction=reduction).sum().backward()
    _close(s.grad, g.grad)


def test_imle_loss_float64_clustered_far_from_origin():
    g = torch.Generator().manual_seed(1)
    s = _clustered(60, 9, g=g).double().requires_grad_(True)
    x = _clustered(45, 9, g=g).double()
    out = fastgen.imle_loss(s, x)
    _close(out, ref.imle_loss(s.detach(), x), rtol=1e-9, atol=1e-9)
    out.backward()
    _close(s.grad, _ref_grad(s, x), rtol=1e-9, atol=1e-9)


def test_imle_loss_ties_go_to_lowest_index_and_duplicates():
    # samples 2 and 5 are identical and nearest to every example: the gradient goes to 2 only
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]])
    s = torch.tensor([[5.0, 5.0], [-4.0, 3.0], [0.0, 0.05], [9.0, 9.0], [3.0, -3.0], [0.0, 0.05]], requires_grad=True)
    fastgen.imle_loss(s, x, reduction="sum").backward()
    assert s.grad[2].abs().sum() > 0
    assert torch.all(s.grad[[0, 1, 3, 4, 5]] == 0)
    _close(s.grad, _ref_grad(s, x, reduction="sum"))


def test_imle_loss_gradient_into_samples_only():
    s = torch.randn(10, 4, requires_grad=True)
    x = torch.randn(6, 4, requires_grad=True)
    fastgen.imle_loss(s, x).backward()
    assert s.grad is not None and x.grad is None
    # one example pulls one sample: d/ds_j = -2 (x_i - s_j) / N summed over the examples choosing j
    _close(s.grad, _ref_grad(s, x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_imle_loss_low_precision(dtype):
    s = (torch.randn(30, 8) * 2).to(dtype).requires_grad_(True)
    x = (torch.randn(20, 8) * 2).to(dtype)
    out = fastgen.imle_loss(s, x)
    assert out.dtype == dtype
    want = ref.imle_loss(s.detach().float(), x.float())
    _close(out.float(), want.float(), rtol=2e-2, atol=2e-2)
    out.backward()
    assert s.grad.dtype == dtype and torch.isfinite(s.grad.float()).all()


# ----------------------------------------------------------------------------- conditional
@pytest.mark.parametrize("per_condition", [1, 5])
def test_imle_loss_conditional(per_condition):
    B, S = 4, 11
    s = torch.randn(B, S, 2, 3, requires_grad=True)
    x = torch.randn(B, 2, 3) if per_condition == 1 else torch.randn(B, per_condition, 2, 3)
    out = fastgen.imle_loss(s, x, conditional=True, reduction="none")
    want = ref.imle_loss(s.detach(), x, conditional=True, reduction="none")
    assert out.shape == want.shape == ((B,) if per_condition == 1 else (B, per_condition))
    _close(out, want)
    # each condition only sees its own samples: equal to a loop of unconditional losses
    loop = torch.stack([fastgen.imle_loss(s[b], x[b][None] if per_condition == 1 else x[b], reduction="none")
                        for b in range(B)])
    _close(out, loop.reshape(out.shape))
    fastgen.imle_loss(s, x, conditional=True).backward()
    _close(s.grad, _ref_grad(s, x, conditional=True))


def test_imle_loss_conditional_uses_one_batched_knn(monkeypatch):
    calls = []
    real = fastgen.knn

    def spy(q, k, kk=1, **kw):
        calls.append(tuple(q.shape))
        return real(q, k, kk, **kw)

    monkeypatch.setattr(fastgen, "knn", spy)
    fastgen.imle_loss(torch.randn(6, 9, 4), torch.randn(6, 3, 4), conditional=True)
    assert calls == [(6, 3, 4)]


# ----------------------------------------------------------------------------- RS-IMLE
def _rs_case(g):
    # example 0 has 12 samples inside radius 1 (more than the first K = 8), example 1 has all
    # samples inside the radius, example 2 has none inside
    x = torch.tensor([[0.0, 0.0], [50.0, 50.0], [-20.0, 0.0]])
    near0 = 0.5 * torch.rand(12, 2, generator=g)
    ring = torch.randn(6, 2, generator=g)
    ring = 1.5 * ring / ring.norm(dim=1, keepdim=True) + 3 * torch.rand(6, 1, generator=g)
    s = torch.cat([near0, ring, torch.randn(4, 2, generator=g) * 3 + torch.tensor([8.0, -8.0])])
    return s[torch.randperm(len(s), generator=g)], x


@pytest.mark.parametrize("k0", [1, 2, 8, 64])
def test_nearest_eligible_widens_until_exact(k0):
    g = torch.Generator().manual_seed(3)
    s, x = _rs_case(g)
    x = torch.cat([x, torch.randn(5, 2, generator=g) * 4])
    d, i, found, d0, i0 = nearest_eligible(x[None], s[None], 1.0, k0=k0)
    wd, wi, wf = ref.nearest_eligible(x[None], s[None], 1.0)
    assert torch.equal(found, wf) and torch.equal(i[found], wi[wf])
    _close(d[found], wd[wf])
    bd, bi, _ = ref.nearest_eligible(x[None], s[None], 0.0)
    assert torch.equal(i0, bi)


@pytest.mark.parametrize("radius", [0.3, 1.0, 2.0, 1e4])
def test_rs_imle_loss_matches_brute_force(radius):
    g = torch.Generator().manual_seed(4)
    s, x = _rs_case(g)
    x = torch.cat([x, torch.randn(9, 2, generator=g) * 3])
    s.requires_grad_(True)
    out = fastgen.imle_loss(s, x, rejection_radius=radius, reduction="none")
    _close(out, ref.imle_loss(s.detach(), x, rejection_radius=radius, reduction="none"))
    fastgen.imle_loss(s, x, rejection_radius=radius).backward()
    _close(s.grad, _ref_grad(s, x, rejection_radius=radius))
    if radius == 1e4:   # every sample rejected for every example: documented as contributing 0
        assert torch.all(out == 0) and torch.all(s.grad == 0)


def test_rs_imle_conditional_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    B = 3
    s = torch.randn(B, 40, 3, generator=g)
    s[1, :30] = s[1, :30] * 0.01        # condition 1: 30 samples inside the radius of example 0
    x = torch.randn(B, 4, 3, generator=g) * 2
    x[1, 0] = 0
    s.requires_grad_(True)
    out = fastgen.imle_loss(s, x, conditional=True, rejection_radius=0.8, reduction="none")
    _close(out, ref.imle_loss(s.detach(), x, conditional=True, rejection_radius=0.8, reduction="none"))
    fastgen.imle_loss(s, x, conditional=True, rejection_radius=0.8).backward()
    _close(s.grad, _ref_grad(s, x, conditional=True, rejection_radius=0.8))


# ----------------------------------------------------------------------------- module
def test_module_matches_functional():
    s = torch.randn(20, 5, requires_grad=True)
    x = torch.randn(7, 5)
    m = fastgen.nn.IMLELoss(rejection_radius=0.5, reduction="sum")
    _close(m(s, x), fastgen.imle_loss(s, x, rejection_radius=0.5, reduction="sum"))
    assert "rejection_radius=0.5" in repr(m)
    with pytest.raises(ValueError, match="reduction"):
        fastgen.nn.IMLELoss(reduction="avg")
    with pytest.raises(ValueError, match="rejection_radius"):
        fastgen.nn.IMLELoss(rejection_radius=-1.0)
    with pytest.raises(TypeError, match="conditional"):
        fastgen.nn.IMLELoss(conditional="yes")


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("samples,data,kw,exc,name", [
    (torch.randn(4, 3), torch.randn(5, 2), {}, ValueError, "trailing shape"),
    (torch.randint(0, 3, (4, 3)), torch.randn(5, 3), {}, TypeError, "samples"),
    (torch.randn(4, 3), torch.randint(0, 3, (5, 3)), {}, TypeError, "data"),
    (torch.randn(0, 3), torch.randn(5, 3), {}, ValueError, "samples"),
    (torch.randn(4, 3), torch.randn(0, 3), {}, ValueError, "data"),
    ([[1.0, 2.0]], torch.randn(5, 2), {}, TypeError, "samples"),
    (torch.randn(4, 3), torch.randn(5, 3), {"rejection_radius": -0.1}, ValueError, "rejection_radius"),
    (torch.randn(4, 3), torch.randn(5, 3), {"rejection_radius": float("nan")}, ValueError, "rejection_radius"),
    (torch.randn(4, 3), torch.randn(5, 3), {"rejection_radius": "1"}, TypeError, "rejection_radius"),
    (torch.randn(4, 3), torch.randn(5, 3), {"reduction": "avg"}, ValueError, "reduction"),
    (torch.randn(4, 3), torch.randn(5, 3), {"conditional": 1}, TypeError, "conditional"),
    (torch.randn(2, 4, 3), torch.randn(3, 5, 3), {"conditional": True}, ValueError, "data"),
    (torch.randn(2, 4, 3), torch.randn(2, 5, 4), {"conditional": True}, ValueError, "data"),
    (torch.randn(2, 4, 3), torch.randn(2, 2, 5, 3), {"conditional": True}, ValueError, "data"),
    (torch.randn(4), torch.randn(4), {"conditional": True}, ValueError, "samples"),
    (torch.tensor([[0.0, float("nan")]]), torch.randn(5, 2), {}, ValueError, "samples"),
    (torch.randn(4, 2), torch.tensor([[float("inf"), 0.0]]), {}, ValueError, "data"),
])
def test_imle_loss_bad_input(samples, data, kw, exc, name):
    with pytest.raises(exc, match=name):
        fastgen.imle_loss(samples, data, **kw)


def test_imle_loss_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        fastgen.imle_loss(torch.randn(4, 3), torch.randn(5, 3), backend="nope")


# ----------------------------------------------------------------------------- select_latents
def _gen(latent_dim=4, out=6, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(latent_dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, out))


def _pool_sampler(pool, sizes):
    pos = [0]

    def sampler(n):
        sizes.append(n)
        z = pool[pos[0]:pos[0] + n]
        pos[0] += n
        return z

    return sampler


@pytest.mark.parametrize("radius", [0.0, 0.9, 1.6, 1e3])
@pytest.mark.parametrize("batch_size", [7, 64, 1000])
def test_select_latents_matches_brute_force(radius, batch_size):
    g = _gen()
    x = torch.randn(40, 6) * 0.8
    pool = torch.randn(333, 4)
    sizes = []
    z, d = fastgen.imle.select_latents(g, x, pool_size=333, latent_dim=4, batch_size=batch_size,
                                       rejection_radius=radius, latent_sampler=_pool_sampler(pool, sizes))
    with torch.no_grad():
        zr, dr = ref.select_latents(pool, g(pool), x, radius)
    assert max(sizes) <= batch_size and sum(sizes) == 333      # streamed in chunks
    assert z.shape == (40, 4) and d.shape == (40,) and d.dtype == torch.float32
    assert torch.equal(z, zr)
    _close(d, dr)
    if radius == 1e3:   # every candidate rejected: fallback to the nearest overall
        zr0, _ = ref.select_latents(pool, g(pool).detach(), x, 0.0)
        assert torch.equal(z, zr0)


def test_select_latents_ties_pick_earliest_candidate():
    x = torch.zeros(3, 2)
    pool = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])   # 1, 2, 3 tie at distance 1
    z, d = fastgen.imle.select_latents(lambda t: t, x, pool_size=4, latent_dim=2, batch_size=1,
                                       latent_sampler=_pool_sampler(pool, []))
    assert torch.equal(z, pool[[1, 1, 1]]) and torch.equal(d, torch.ones(3))


def test_select_latents_feature_fn_and_images():
    torch.manual_seed(0)
    g = torch.nn.Sequential(torch.nn.Linear(3, 12), torch.nn.Unflatten(1, (3, 4)))
    x = torch.randn(25, 3, 4)
    proj = torch.randn(12, 5)

    def feat(t):
        return t.reshape(len(t), -1) @ proj

    pool = torch.randn(120, 3)
    z, d = fastgen.imle.select_latents(g, x, pool_size=120, latent_dim=3, batch_size=50, feature_fn=feat,
                                       latent_sampler=_pool_sampler(pool, []))
    with torch.no_grad():
        zr, dr = ref.select_latents(pool, feat(g(pool)), feat(x))
    assert torch.equal(z, zr)
    _close(d, dr, rtol=1e-4, atol=1e-4)


def test_select_latents_default_sampler_reproducible_and_no_grad():
    g = _gen()
    x = torch.randn(10, 6)
    a = fastgen.imle.select_latents(g, x, latent_dim=4, rng=torch.Generator().manual_seed(7))
    b = fastgen.imle.select_latents(g, x, latent_dim=4, rng=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not a[0].requires_grad and not a[1].requires_grad


@pytest.mark.parametrize("kw,exc,name", [
    ({"pool_size": 0}, ValueError, "pool_size"),
    ({"latent_dim": 0}, ValueError, "latent_dim"),
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"rejection_radius": -1.0}, ValueError, "rejection_radius"),
    ({"latent_sampler": lambda n: torch.randn(n, 3)}, ValueError, "latent_sampler"),
    ({"latent_sampler": lambda n: [0.0] * n}, TypeError, "latent_sampler"),
    ({"feature_fn": 3}, TypeError, "feature_fn"),
])
def test_select_latents_bad_args(kw, exc, name):
    args = dict(pool_size=20, latent_dim=4)
    args.update(kw)
    with pytest.raises(exc, match=name):
        fastgen.imle.select_latents(_gen(), torch.randn(5, 6), **args)


def test_select_latents_bad_generator_and_data():
    with pytest.raises(ValueError, match="generator output"):
        fastgen.imle.select_latents(_gen(out=5), torch.randn(5, 6), pool_size=10, latent_dim=4)
    with pytest.raises(ValueError, match="generator output"):
        fastgen.imle.select_latents(lambda z: z[:, :1].repeat(1, 6) * float("nan"), torch.randn(5, 6),
                                    pool_size=10, latent_dim=4)
    with pytest.raises(TypeError, match="data"):
        fastgen.imle.select_latents(_gen(), torch.zeros(5, 6, dtype=torch.int64), pool_size=10, latent_dim=4)
    with pytest.raises(ValueError, match="data"):
        fastgen.imle.select_latents(_gen(), torch.full((5, 6), float("nan")), pool_size=10, latent_dim=4)
    with pytest.raises(TypeError, match="generator"):
        fastgen.imle.select_latents(lambda z: 1.0, torch.randn(5, 6), pool_size=10, latent_dim=4)


# ----------------------------------------------------------------------------- IMLESampler
def test_sampler_epochs_reselect_and_perturb():
    g = _gen()
    x = torch.randn(30, 6)
    smp = fastgen.imle.IMLESampler(g, x, latent_dim=4, pool_factor=3, staleness=2, noise=0.0, seed=1)
    seen = torch.cat([idx for _, idx in smp.epoch(batch_size=8)])
    assert torch.equal(seen.sort().values, torch.arange(30)) and smp.selections == 1
    with torch.no_grad():
        zr, _ = ref.select_latents(*_replay_pool(smp, 90), x)
    assert torch.equal(smp.latents, zr)
    for z, idx in smp.epoch(batch_size=8):                # epoch 2: no re-selection, no noise
        assert torch.equal(z, smp.latents[idx])
    assert smp.selections == 1
    list(smp.epoch(batch_size=8))
    assert smp.selections == 2                             # staleness 2: re-selected at epoch 3
    noisy = fastgen.imle.IMLESampler(g, x, latent_dim=4, pool_factor=3, noise=0.1, seed=1)
    z, idx = next(noisy.epoch(batch_size=30, shuffle=False))
    dz = z - noisy.latents[idx]
    assert 0.05 < float(dz.std()) < 0.2
    state = noisy.state_dict()
    other = fastgen.imle.IMLESampler(g, x, latent_dim=4, pool_factor=3, noise=0.1, seed=9)
    other.load_state_dict(state)
    assert torch.equal(other.latents, noisy.latents) and other.epochs_seen == 1
    # state_dict is a snapshot: per-batch selection writes into the live latents in place
    pb = fastgen.imle.IMLESampler(g, x, latent_dim=4, pool_factor=2, per_batch=True, noise=0.0, seed=2)
    list(pb.epoch(batch_size=8))
    snap = pb.state_dict()
    kept = snap["latents"].clone()
    list(pb.epoch(batch_size=8))
    assert torch.equal(snap["latents"], kept) and not torch.equal(pb.latents, kept)
    pb.load_state_dict(snap)
    list(pb.epoch(batch_size=8))
    assert torch.equal(snap["latents"], kept)


def _replay_pool(smp, n):
    """The pool the sampler drew at its first selection (its rng replayed from the seed)."""
    rng = torch.Generator().manual_seed(1)
    pool = torch.randn(n, 4, generator=rng)
    with torch.no_grad():
        return pool, smp.generator(pool)


def test_sampler_per_batch_pools_match_brute_force():
    g = _gen()
    x = torch.randn(20, 6)
    pools = []

    def rec(n):
        z = torch.randn(n, 4)
        pools.append(z)
        return z

    smp = fastgen.imle.IMLESampler(g, x, latent_dim=4, pool_factor=1.5, per_batch=True, noise=0.0,
                                   latent_sampler=rec)
    for (z, idx), pool in zip(smp.epoch(batch_size=8), _lazy(pools)):
        assert len(pool) == round(1.5 * len(idx))
        with torch.no_grad():
            zr, _ = ref.select_latents(pool, g(pool), x[idx])
        assert torch.equal(z, zr)
    assert smp.selections == 3 and len(pools) == 3


def _lazy(lst):
    i = 0
    while True:
        yield lst[i]
        i += 1


def test_sampler_bad_args():
    with pytest.raises(ValueError, match="staleness"):
        fastgen.imle.IMLESampler(_gen(), torch.randn(5, 6), latent_dim=4, staleness=0)
    with pytest.raises(ValueError, match="noise"):
        fastgen.imle.IMLESampler(_gen(), torch.randn(5, 6), latent_dim=4, noise=-1.0)
    with pytest.raises(ValueError, match="pool_factor"):
        fastgen.imle.IMLESampler(_gen(), torch.randn(5, 6), latent_dim=4, pool_factor=0)


# ----------------------------------------------------------------------------- every knn backend
def _knn_backends():
    from fastgen import _dispatch

    out = []
    for b in ("torch", "cpu", "faiss"):
        why = _dispatch.unavailable_reason("knn", b, "cpu")
        out.append(pytest.param(b, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return out


@pytest.mark.parametrize("backend", _knn_backends())
def test_every_knn_backend_gives_the_brute_force_answer(backend):
    g = torch.Generator().manual_seed(8)
    s = _clustered(70, 5, g=g).requires_grad_(True)
    x = _clustered(33, 5, g=g)
    out = fastgen.imle_loss(s, x, reduction="none", backend=backend)
    _close(out, ref.imle_loss(s.detach(), x, reduction="none"), rtol=1e-4, atol=1e-3)
    sc, xc = torch.randn(3, 20, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    _close(fastgen.imle_loss(sc, xc, conditional=True, rejection_radius=1.0, reduction="none", backend=backend),
           ref.imle_loss(sc, xc, conditional=True, rejection_radius=1.0, reduction="none"))
    gen = _gen()
    pool = torch.randn(200, 4, generator=g)
    xd = torch.randn(30, 6, generator=g)
    z, d = fastgen.imle.select_latents(gen, xd, pool_size=200, latent_dim=4, batch_size=64, rejection_radius=0.5,
                                       latent_sampler=_pool_sampler(pool, []), backend=backend)
    with torch.no_grad():
        zr, dr = ref.select_latents(pool, gen(pool), xd, 0.5)
    assert torch.equal(z, zr)
    _close(d, dr)


# ----------------------------------------------------------------------------- training loop pieces
def test_prior_and_generator_pieces():
    from fastgen.imle.train import IMLEConfig, MLPGenerator, draw_prior, train_imle

    z = draw_prior("uniform", 20000, 3, torch.Generator().manual_seed(0))
    assert z.abs().max() <= 3 ** 0.5 and abs(float(z.var()) - 1) < 0.05
    with pytest.raises(ValueError, match="prior"):
        draw_prior("cauchy", 4, 2)
    g = MLPGenerator(2, 2, (8,), "none", skip=True)
    torch.nn.init.zeros_(g.net[-1].weight)
    torch.nn.init.zeros_(g.net[-1].bias)
    zz = torch.randn(5, 2)
    assert torch.equal(g(zz), zz)                        # the skip starts as the identity
    with pytest.raises(ValueError, match="out_act"):
        MLPGenerator(2, 2, out_act="tanh")
    with pytest.raises(ValueError, match="select_bf16"):
        train_imle(torch.rand(10, 2), IMLEConfig(epochs=1, select_bf16="yes"), progress=False)
    res = train_imle(torch.rand(40, 3), IMLEConfig(epochs=3, hidden=(16,), latent_dim=4, staleness=2,
                                                   select_bf16="off"), progress=False)
    assert len(res.loss) == 3 and res.sampler.selections == 2 and res.sample(7).shape == (7, 3)
