"""Adaptive IMLE, RS-IMLE selection, random-projection features and checkpoint / resume of the
IMLE training loop, each against a brute-force Python-loop reference on tiny data."""
import math

import pytest
import torch

from fastgen.imle import AdaptiveIMLESampler, IMLESampler, RandomProjection
from fastgen.imle.train import IMLEConfig, load_checkpoint, make_sampler, train_imle


# --------------------------------------------------------------------------- helpers
class RecordingSampler:
    """latent_sampler that draws N(0, I) from its own generator and records every pool."""

    def __init__(self, latent_dim, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.latent_dim = latent_dim
        self.pools = []

    def __call__(self, n):
        z = torch.randn(n, self.latent_dim, generator=self.g)
        self.pools.append(z.clone())
        return z


class MovingGenerator:
    """g_t(z) = tanh(z @ A_t) * 2 + b: a fixed random map whose weights change between epochs
    (so current distances move, some below their thresholds, some not)."""

    def __init__(self, latent_dim, dim, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = torch.randn(latent_dim, dim, generator=g)
        self.b = torch.randn(dim, generator=g) * 0.1
        self.g = g

    def step(self):
        self.A = self.A + 0.3 * torch.randn(self.A.shape, generator=self.g)

    def __call__(self, z):
        return torch.tanh(z @ self.A) * 2 + self.b


def brute_nearest(x, samples, radius=0.0):
    """Index of the nearest sample for each row of x (float64), among samples at distance >=
    radius; an example with none eligible gets its nearest overall. Ties: lowest index."""
    out = []
    for i in range(x.shape[0]):
        d = ((samples.double() - x[i].double()) ** 2).sum(1)
        elig = [j for j in range(len(d)) if math.sqrt(d[j]) >= radius]
        pool = elig if elig else list(range(len(d)))
        out.append(min(pool, key=lambda j: (float(d[j]), j)))
    return out


def reference_adaptive(x, gen_steps, pools, *, epochs, staleness, gamma, max_age, radius=0.0):
    """Python loop over examples of the reference training loop's bookkeeping; returns the
    per-epoch (latents, tau2, age) after each epoch's check. ``gen_steps[e]`` is the generator
    used at epoch e; ``pools`` the candidate pools in the order they were drawn."""
    N = x.shape[0]
    pools = list(pools)
    lat, tau2, age = None, [None] * N, [0] * N
    states = []
    for e in range(epochs):
        g = gen_steps[e]
        if lat is None or e % staleness == 0:
            if lat is None:
                due = list(range(N))
            else:
                due = []
                for i in range(N):
                    d = float(((g(lat[i:i + 1])[0].double() - x[i].double()) ** 2).sum())
                    if d < tau2[i] or age[i] >= max_age:
                        tau2[i] = d * (1 - gamma) ** 2
                        due.append(i)
            if due:
                pool = pools.pop(0)
                samples = g(pool)
                idx = brute_nearest(x[due], samples, radius)
                if lat is None:
                    lat = torch.zeros(N, pool.shape[1])
                for i, j in zip(due, idx):
                    lat[i] = pool[j]
                    age[i] = 0
                    if e == 0:
                        tau2[i] = float(((samples[j].double() - x[i].double()) ** 2).sum()) * (1 - gamma) ** 2
        age = [a + 1 for a in age]
        states.append((lat.clone(), torch.tensor(tau2, dtype=torch.float64), torch.tensor(age)))
    assert not pools, "the sampler drew more pools than the reference used"
    return states


# --------------------------------------------------------------------------- adaptive vs reference
@pytest.mark.parametrize("radius", [0.0, 1.5])
def test_adaptive_matches_python_loop_reference(radius):
    torch.manual_seed(0)
    N, D, L = 13, 3, 2
    x = torch.randn(N, D) * 1.5
    gen = MovingGenerator(L, D, seed=1)
    rec = RecordingSampler(L, seed=2)
    s = AdaptiveIMLESampler(gen, x, latent_dim=L, pool_factor=3, staleness=2, gamma=0.1, max_age=4, noise=0.0,
                            rejection_radius=radius, latent_sampler=rec, seed=3)
    epochs = 12
    snaps, gens = [], []
    for e in range(epochs):
        gens.append(MovingGenerator(L, D, seed=1))
        gens[-1].A, gens[-1].b = gen.A.clone(), gen.b.clone()
        seen = torch.cat([idx for _, idx in s.epoch(4)])
        assert sorted(seen.tolist()) == list(range(N))
        snaps.append((s.latents.clone(), s.tau2.clone(), s.age.clone()))
        gen.step()
    ref = reference_adaptive(x, gens, rec.pools, epochs=epochs, staleness=2, gamma=0.1, max_age=4, radius=radius)
    for e, ((lat, tau2, age), (rlat, rtau2, rage)) in enumerate(zip(snaps, ref)):
        assert torch.equal(lat, rlat), e
        assert torch.allclose(tau2.double(), rtau2, rtol=1e-5), e
        assert torch.equal(age, rage), e
    counts = [n for _, n in s.history]
    assert s.history[0] == (0, N) and len(s.history) == epochs // 2
    assert any(0 < n < N for n in counts[1:]), counts          # some examples kept their latent
    assert len(rec.pools) == sum(1 for n in counts if n)        # no pool drawn when nothing is due


def test_adaptive_per_batch_matches_python_loop_reference():
    torch.manual_seed(4)
    N, D, L, B = 10, 3, 2, 4
    x = torch.randn(N, D) * 1.5
    gen = MovingGenerator(L, D, seed=11)
    rec = RecordingSampler(L, seed=12)
    s = AdaptiveIMLESampler(gen, x, latent_dim=L, pool_factor=1.5, staleness=2, gamma=0.1, max_age=4, noise=0.0,
                            per_batch=True, latent_sampler=rec)
    pools = []
    lat, tau2, age = torch.zeros(N, L), [None] * N, [0] * N
    for e in range(9):
        n_pools = len(rec.pools)
        got = list(s.epoch(B, shuffle=False))
        new_pools = rec.pools[n_pools:]
        g = gen
        for b in range(0, N, B):                      # the reference, one example at a time
            batch = list(range(b, min(b + B, N)))
            if e % 2 == 0:
                due = []
                for i in batch:
                    d = float(((g(lat[i:i + 1])[0].double() - x[i].double()) ** 2).sum())
                    if e == 0 or d < tau2[i] or age[i] >= 4:
                        if e:
                            tau2[i] = d * 0.81
                        due.append(i)
                if due:
                    pool = new_pools.pop(0)
                    assert len(pool) == round(1.5 * len(batch))
                    samples = g(pool)
                    for i, j in zip(due, brute_nearest(x[due], samples)):
                        lat[i], age[i] = pool[j], 0
                        if e == 0:
                            tau2[i] = float(((samples[j].double() - x[i].double()) ** 2).sum()) * 0.81
            for i in batch:
                age[i] += 1
        assert not new_pools
        assert torch.equal(torch.cat([z for z, _ in got]), lat) and torch.equal(s.latents, lat), e
        assert torch.allclose(s.tau2.double(), torch.tensor(tau2, dtype=torch.float64), rtol=1e-5), e
        assert s.age.tolist() == age, e
        gen.step()
    assert [h[0] for h in s.history] == [0, 2, 4, 6, 8] and s.history[0][1] == N
    assert any(0 < n < N for _, n in s.history[1:])


def test_adaptive_reselects_only_due_examples_and_forces_old_ones():
    x = torch.randn(20, 4)
    gen = MovingGenerator(3, 4, seed=5)
    s = AdaptiveIMLESampler(gen, x, latent_dim=3, pool_factor=2, staleness=1, gamma=0.5, max_age=3, noise=0.0)
    list(s.epoch(8))
    z0 = s.latents.clone()
    # nothing moves: the current distances equal the selection distances, above tau = 0.25 d
    for _ in range(2):
        list(s.epoch(8))
    assert torch.equal(s.latents, z0) and [n for _, n in s.history] == [20, 0, 0]
    before = s.current_dist2()
    list(s.epoch(8))                       # age 3 = max_age: every example is forced
    assert s.history[-1] == (3, 20) and torch.equal(s.age, torch.ones(20, dtype=torch.int64))
    # every tau now holds (1 - gamma)^2 times the distance before the forced re-selection
    assert torch.allclose(s.tau2, 0.25 * before)


def test_adaptive_with_random_projection_features():
    torch.manual_seed(1)
    x = torch.randn(9, 12)
    gen = MovingGenerator(4, 12, seed=7)
    proj = RandomProjection(5, 12, seed=3)
    rec = RecordingSampler(4, seed=8)
    s = AdaptiveIMLESampler(gen, x, latent_dim=4, pool_factor=4, feature_fn=proj, latent_sampler=rec, noise=0.0)
    list(s.epoch(5))
    pool = rec.pools[0]
    want = brute_nearest(proj(x), proj(gen(pool)))
    assert torch.equal(s.latents, pool[want])
    d = ((proj(gen(s.latents)).double() - proj(x).double()) ** 2).sum(1)
    assert torch.allclose(s.current_dist2().double(), d, rtol=1e-5)
    assert torch.allclose(s.dist2.double(), d, rtol=1e-4)


def test_adaptive_state_dict_round_trip():
    x = torch.randn(17, 3)
    gen = MovingGenerator(2, 3, seed=4)

    def make():
        return AdaptiveIMLESampler(gen, x, latent_dim=2, pool_factor=2, staleness=2, gamma=0.05, max_age=4, seed=9)

    a = make()
    for _ in range(3):
        list(a.epoch(5))
    st = a.state_dict()
    b = make()
    b.load_state_dict(st)
    for _ in range(4):
        ya, yb = list(a.epoch(5)), list(b.epoch(5))
        for (za, ia), (zb, ib) in zip(ya, yb):
            assert torch.equal(za, zb) and torch.equal(ia, ib)
    for k in ("latents", "dist2", "tau2", "age"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    assert a.history == b.history and a.epochs_seen == b.epochs_seen == 7
    bad = dict(st, tau2=torch.zeros(5))
    with pytest.raises(ValueError, match="tau2"):
        make().load_state_dict(bad)
    with pytest.raises(ValueError, match="latents"):
        make().load_state_dict(dict(st, latents=torch.zeros(17, 5)))


@pytest.mark.parametrize("kw, exc, name", [
    (dict(gamma=1.0), ValueError, "gamma"),
    (dict(gamma=-0.1), ValueError, "gamma"),
    (dict(max_age=0), ValueError, "max_age"),
    (dict(max_age=2.5), TypeError, "max_age"),
    (dict(staleness=0), ValueError, "staleness"),
    (dict(pool_factor=0), ValueError, "pool_factor"),
    (dict(noise=-1.0), ValueError, "noise"),
    (dict(feature_fn=3), TypeError, "feature_fn"),
    (dict(latent_dim=0), ValueError, "latent_dim"),
    (dict(select_batch_size=0), ValueError, "select_batch_size"),
])
def test_adaptive_bad_args(kw, exc, name):
    args = dict(latent_dim=2)
    args.update(kw)
    with pytest.raises(exc, match=name):
        AdaptiveIMLESampler(lambda z: z, torch.randn(4, 2), **args)


def test_adaptive_bad_data_and_generator():
    with pytest.raises(TypeError, match="data"):
        AdaptiveIMLESampler(lambda z: z, torch.ones(3, 2, dtype=torch.int64), latent_dim=2)
    with pytest.raises(TypeError, match="generator"):
        AdaptiveIMLESampler(None, torch.randn(3, 2), latent_dim=2)
    s = AdaptiveIMLESampler(lambda z: z, torch.randn(3, 2), latent_dim=2)
    with pytest.raises(RuntimeError, match="no latents"):
        s.current_dist2()
    with pytest.raises(ValueError, match="batch_size"):
        list(s.epoch(0))


# --------------------------------------------------------------------------- RS-IMLE through the sampler
def test_rs_imle_sampler_selection_matches_brute_force():
    torch.manual_seed(3)
    x = torch.randn(11, 3)
    gen = MovingGenerator(2, 3, seed=2)
    rec = RecordingSampler(2, seed=6)
    cfg = IMLEConfig(method="rs-imle", rejection_radius=1.0, latent_dim=2, pool_factor=2, noise=0.0)
    s = make_sampler(gen, x, cfg)
    assert isinstance(s, IMLESampler) and s.rejection_radius == 1.0
    s.latent_sampler = rec
    list(s.epoch(4))
    pool = rec.pools[0]
    assert torch.equal(s.latents, pool[brute_nearest(x, gen(pool), 1.0)])
    # a radius larger than every distance: every example falls back to its nearest candidate
    s.rejection_radius = 1e6
    s.reselect()
    pool = rec.pools[1]
    assert torch.equal(s.latents, pool[brute_nearest(x, gen(pool))])


# --------------------------------------------------------------------------- random projection
def test_random_projection_seeded_and_distance_preserving():
    p1, p2 = RandomProjection(64, 200, seed=4), RandomProjection(64, 200, seed=4)
    assert torch.equal(p1.weight, p2.weight) and not torch.equal(p1.weight, RandomProjection(64, 200, seed=5).weight)
    assert not any(True for _ in p1.parameters()) and "weight" in p1.state_dict()
    x = torch.randn(300, 200)
    y = p1(x)
    assert y.shape == (300, 64) and y.dtype == torch.float32
    d_in = ((x[:150] - x[150:]) ** 2).sum(1)
    d_out = ((y[:150] - y[150:]) ** 2).sum(1)
    assert 0.85 < float((d_out / d_in).mean()) < 1.15          # E ratio = 1 (std of the mean ~0.014)
    lazy = RandomProjection(64, seed=4)
    assert torch.equal(lazy(x.reshape(300, 10, 20)), y)          # lazy draw from the flattened size
    assert lazy(x.double()).dtype == torch.float64
    fresh = RandomProjection(64, seed=0)
    fresh.load_state_dict(p1.state_dict())
    assert torch.equal(fresh(x), y)


@pytest.mark.parametrize("args, kw, exc, name", [
    ((0,), {}, ValueError, "dim"),
    ((2.0,), {}, TypeError, "dim"),
    ((3, 0), {}, ValueError, "in_features"),
    ((3,), dict(seed=1.5), TypeError, "seed"),
])
def test_random_projection_bad_args(args, kw, exc, name):
    with pytest.raises(exc, match=name):
        RandomProjection(*args, **kw)


def test_random_projection_bad_input():
    p = RandomProjection(3, 4)
    with pytest.raises(ValueError, match="4 features"):
        p(torch.randn(2, 5))
    with pytest.raises(ValueError, match="x must be"):
        p(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        p(torch.ones(2, 4, dtype=torch.int64))


# --------------------------------------------------------------------------- training loop: config, resume
def _tiny(method, **kw):
    cfg = dict(method=method, epochs=6, latent_dim=3, hidden=(16,), batch_size=16, pool_factor=2, staleness=2,
               noise=0.01, out_act="none", select_bf16="off", seed=5, max_age=4, gamma=0.1)
    if method == "rs-imle":
        cfg["rejection_radius"] = 0.3
    cfg.update(kw)
    return IMLEConfig(**cfg)


@pytest.mark.parametrize("method, kw", [
    ("imle", {}),
    ("rs-imle", {}),
    ("adaptive-imle", {}),
    ("adaptive-imle", dict(proj_dim=2)),
    ("adaptive-imle", dict(per_batch=True, staleness=1, max_age=2)),
    ("imle", dict(per_batch=True, prior="uniform", skip=True, lr_final=1e-4)),
])
def test_resume_is_bit_exact(tmp_path, method, kw):
    torch.manual_seed(0)
    x = torch.randn(40, 4)
    cfg = _tiny(method, **kw)
    full = train_imle(x, cfg, progress=False)

    class Stop(Exception):
        pass

    def interrupt(ep, res):
        if ep == 4:                       # dies after epoch 5, past the checkpoint of epoch 4
            raise Stop

    ck = str(tmp_path / "ck.pt")
    with pytest.raises(Stop):
        train_imle(x, cfg, progress=False, checkpoint=ck, checkpoint_every=2, callback=interrupt)
    assert load_checkpoint(ck)["epoch"] == 4
    resumed = train_imle(x, cfg, progress=False, checkpoint=ck, checkpoint_every=2, resume=True)
    assert resumed.start_epoch == 4 and load_checkpoint(ck)["epoch"] == 6
    assert resumed.loss == full.loss and resumed.select_dist2 == full.select_dist2
    assert resumed.reselected == full.reselected
    for (k, a), b in zip(full.generator.state_dict().items(), resumed.generator.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(full.sample(50, seed=3), resumed.sample(50, seed=3))


def test_resume_rejects_a_different_config_and_bad_args(tmp_path):
    x = torch.randn(20, 4)
    ck = str(tmp_path / "ck.pt")
    train_imle(x, _tiny("imle", epochs=2), progress=False, checkpoint=ck, checkpoint_every=1)
    with pytest.raises(ValueError, match="lr="):
        train_imle(x, _tiny("imle", epochs=3, lr=5e-4), progress=False, checkpoint=ck, resume=True)
    more = train_imle(x, _tiny("imle", epochs=3, temperature=1.3), progress=False, checkpoint=ck, resume=True)
    assert more.start_epoch == 2 and len(more.loss) == 3
    with pytest.raises(ValueError, match="checkpoint_every"):
        train_imle(x, _tiny("imle"), progress=False, checkpoint=ck, checkpoint_every=-1)
    with pytest.raises(ValueError, match="checkpoint"):
        train_imle(x, _tiny("imle"), progress=False, resume=True)
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastgen IMLE checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))


@pytest.mark.parametrize("kw, name", [
    (dict(method="gan"), "method"),
    (dict(method="rs-imle", rejection_radius=0.0), "rejection_radius"),
    (dict(proj_dim=-1), "proj_dim"),
    (dict(select_bf16="maybe"), "select_bf16"),
    (dict(prior="cauchy"), "prior"),
    (dict(epochs=0), "epochs"),
])
def test_config_validation_names_the_field(kw, name):
    with pytest.raises(ValueError, match=name):
        train_imle(torch.randn(8, 2), IMLEConfig(**kw), progress=False)


def test_make_sampler_picks_the_method():
    x = torch.randn(10, 4)
    a = make_sampler(lambda z: z @ torch.ones(3, 4), x, _tiny("adaptive-imle", proj_dim=2))
    assert isinstance(a, AdaptiveIMLESampler) and a.gamma == 0.1 and a.max_age == 4
    assert isinstance(a.feature_fn, RandomProjection) and a.feature_fn.dim == 2
    assert isinstance(make_sampler(lambda z: z, x, _tiny("imle")), IMLESampler)
