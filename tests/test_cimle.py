"""Conditional IMLE (fastgen/imle/conditional.py): select_conditional against a brute-force
Python loop over conditions and candidates, shapes / dtypes, errors, make_condition, and a tiny
training run."""
import pytest
import torch

import fastgen
from fastgen.imle import (CIMLEConfig, ConditionalMLPGenerator, default_cimle_config, make_condition,
                          select_conditional, train_cimle)


def _gen(C, L, D, seed=0):
    torch.manual_seed(seed)
    return ConditionalMLPGenerator(C, L, D, hidden=(16,), out_act="none")


def _brute(gen, data, cond, latents, radius=0.0):
    """Loop over conditions b and candidates s, float64 distances; first strict minimum wins
    (earliest candidate on ties); RS-IMLE: only candidates at distance >= radius, else nearest."""
    B, S, _ = latents.shape
    idx, d2 = [], []
    with torch.no_grad():
        for b in range(B):
            ds = []
            for s in range(S):
                out = gen(cond[b:b + 1], latents[b, s:s + 1])[0]
                ds.append(float(((out.double() - data[b].double()) ** 2).sum()))
            elig = [s for s in range(S) if ds[s] >= radius * radius] if radius > 0 else list(range(S))
            if not elig:
                elig = list(range(S))
            best = elig[0]
            for s in elig:
                if ds[s] < ds[best]:
                    best = s
            idx.append(best)
            d2.append(ds[best])
    return torch.tensor(idx), torch.tensor(d2, dtype=torch.float64)


@pytest.mark.parametrize("batch_size", [None, 3, 7, 12, 1000])
def test_select_matches_brute_force(batch_size):
    g = torch.Generator().manual_seed(0)
    B, S, L, C, D = 9, 5, 3, 4, 6
    gen = _gen(C, L, D)
    data = torch.randn(B, D, generator=g) * 0.3 + 100.0        # far from the origin
    with torch.no_grad():
        gen.net[-1].bias += 100.0
    cond = torch.randn(B, C, generator=g)
    lat = torch.randn(B, S, L, generator=g)
    z, d2, idx = select_conditional(gen, data, cond, n_candidates=S, latent_dim=L, latents=lat, batch_size=batch_size)
    want_i, want_d = _brute(gen, data, cond, lat)
    assert torch.equal(idx, want_i)
    assert torch.equal(z, lat[torch.arange(B), want_i])
    torch.testing.assert_close(d2.double(), want_d, rtol=1e-4, atol=1e-3)
    assert z.shape == (B, L) and z.dtype == torch.float32
    assert d2.shape == (B,) and d2.dtype == torch.float32 and idx.dtype == torch.int64


def _quantised(cond, z):
    return cond + torch.round(z)          # many candidates give the same sample: ties


@pytest.mark.parametrize("batch_size", [2, 3, 4, 100])
def test_select_ties_go_to_earliest_candidate(batch_size):
    g = torch.Generator().manual_seed(3)
    B, S, D = 6, 8, 2
    lat = torch.randint(-1, 2, (B, S, D), generator=g).float()
    cond = torch.randint(-8, 8, (B, D), generator=g).float() / 4     # exact sums: true ties
    data = cond + torch.tensor([0.5, 0.0])        # equidistant from round(z) = (0, 0) and (1, 0)
    z, d2, idx = select_conditional(_quantised, data, cond, n_candidates=S, latent_dim=D, latents=lat,
                                    batch_size=batch_size)
    want_i, want_d = _brute(_quantised, data, cond, lat)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(d2.double(), want_d)
    # near-ties (sums rounded in fp32) across slices: decided on exact distances, like the loop
    cond = torch.randn(B, D, generator=g)
    data = cond + torch.tensor([0.5, 0.0])
    z, d2, idx = select_conditional(_quantised, data, cond, n_candidates=S, latent_dim=D, latents=lat,
                                    batch_size=batch_size)
    assert torch.equal(idx, _brute(_quantised, data, cond, lat)[0])
    # a constant generator: every candidate ties, the first wins
    z, d2, idx = select_conditional(lambda c, zz: c.clone(), data, cond, n_candidates=S, latent_dim=D, latents=lat,
                                    batch_size=batch_size)
    assert torch.all(idx == 0)


@pytest.mark.parametrize("batch_size", [4, 100])
def test_select_rejection_radius_matches_brute_force(batch_size):
    g = torch.Generator().manual_seed(5)
    B, S, L, C, D = 7, 6, 2, 3, 3
    gen = _gen(C, L, D, seed=2)
    data = torch.randn(B, D, generator=g) * 0.1
    cond = torch.randn(B, C, generator=g)
    lat = torch.randn(B, S, L, generator=g)
    _, dall = _brute(gen, data, cond, lat)
    radius = float(dall.sqrt().median()) * 1.05    # some conditions reject everything, some not
    z, d2, idx = select_conditional(gen, data, cond, n_candidates=S, latent_dim=L, latents=lat,
                                    batch_size=batch_size, rejection_radius=radius)
    want_i, want_d = _brute(gen, data, cond, lat, radius=radius)
    assert torch.equal(idx, want_i)
    torch.testing.assert_close(d2.double(), want_d, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_size", [2, 5, 1000])
@pytest.mark.parametrize("radius", [0.0, 0.8])
def test_select_grouped_matches_brute_force(batch_size, radius):
    g = torch.Generator().manual_seed(8)
    B, N, S, L, C, D = 5, 4, 6, 2, 3, 3
    gen = _gen(C, L, D, seed=3)
    data = torch.randn(B, N, D, generator=g) * 0.3
    cond = torch.randn(B, C, generator=g)
    lat = torch.randn(B, S, L, generator=g)
    lat[:, 3] = lat[:, 1]                          # duplicated candidates: ties to the earlier one
    z, d2, idx = select_conditional(gen, data, cond, n_candidates=S, latent_dim=L, latents=lat, grouped=True,
                                    batch_size=batch_size, rejection_radius=radius)
    assert z.shape == (B, N, L) and d2.shape == (B, N) and idx.shape == (B, N)
    for n in range(N):                            # each example against its condition's S samples
        want_i, want_d = _brute(gen, data[:, n], cond, lat, radius=radius)
        assert torch.equal(idx[:, n], want_i)
        assert torch.equal(z[:, n], lat[torch.arange(B), want_i])
        torch.testing.assert_close(d2[:, n].double(), want_d, rtol=1e-5, atol=1e-6)
    assert not bool((idx == 3).any())
    if radius == 0:
        with torch.no_grad():
            samples = gen(cond.repeat_interleave(S, 0), lat.reshape(B * S, L)).reshape(B, S, D)
        per = fastgen.imle_loss(samples, data, conditional=True, reduction="none")     # [B, N]
        torch.testing.assert_close(d2, per, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="data"):
        select_conditional(gen, data[:, 0, 0], cond, n_candidates=S, latent_dim=L, grouped=True)
    with pytest.raises(TypeError, match="grouped"):
        select_conditional(gen, data, cond, n_candidates=S, latent_dim=L, grouped=1)


def test_select_equals_conditional_imle_loss_and_sampler_path():
    g = torch.Generator().manual_seed(1)
    B, S, L, C, D = 11, 4, 3, 2, 5
    gen = _gen(C, L, D, seed=1)
    data = torch.randn(B, D, generator=g)
    cond = torch.randn(B, C, generator=g)
    lat = torch.randn(B, S, L, generator=g)
    z, d2, idx = select_conditional(gen, data, cond, n_candidates=S, latent_dim=L, latents=lat)
    with torch.no_grad():
        samples = gen(cond.repeat_interleave(S, 0), lat.reshape(B * S, L)).reshape(B, S, D)
    per = fastgen.imle_loss(samples, data, conditional=True, reduction="none")
    torch.testing.assert_close(d2, per, rtol=1e-5, atol=1e-6)
    # the default-sampler path draws B * S latents condition-major in one call here
    z2, d22, idx2 = select_conditional(gen, data, cond, n_candidates=S, latent_dim=L,
                                       latent_sampler=lambda n: lat.reshape(n, L).clone())
    assert torch.equal(idx2, idx) and torch.equal(z2, z)
    # rng reproducibility of the default sampler
    a = select_conditional(gen, data, cond, n_candidates=S, latent_dim=L, rng=torch.Generator().manual_seed(9))
    b = select_conditional(gen, data, cond, n_candidates=S, latent_dim=L, rng=torch.Generator().manual_seed(9))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_select_multidim_examples_and_float64():
    g = torch.Generator().manual_seed(2)
    B, S, L = 5, 3, 6
    data = torch.randn(B, 2, 3, generator=g, dtype=torch.float64)
    cond = torch.randn(B, 2, 3, generator=g, dtype=torch.float64)

    def gen(c, z):
        return c + z.reshape(-1, 2, 3).to(c.dtype)

    lat = torch.randn(B, S, L, generator=g)
    z, d2, idx = select_conditional(gen, data, cond, n_candidates=S, latent_dim=L, latents=lat)
    want = ((cond[:, None] + lat.reshape(B, S, 2, 3).double() - data[:, None]) ** 2).flatten(2).sum(-1)
    assert torch.equal(idx, want.argmin(1))
    assert d2.dtype == torch.float32 and z.shape == (B, L)
    torch.testing.assert_close(d2.double(), want.min(1).values, rtol=1e-6, atol=1e-6)


def test_select_bad_input_names_the_argument():
    gen = _gen(2, 3, 4)
    x, c = torch.randn(5, 4), torch.randn(5, 2)
    kw = dict(n_candidates=3, latent_dim=3)
    with pytest.raises(TypeError, match="data"):
        select_conditional(gen, x.long(), c, **kw)
    with pytest.raises(ValueError, match="cond"):
        select_conditional(gen, x, c[:4], **kw)
    with pytest.raises(TypeError, match="cond"):
        select_conditional(gen, x, c.tolist(), **kw)
    with pytest.raises(ValueError, match="n_candidates"):
        select_conditional(gen, x, c, n_candidates=0, latent_dim=3)
    with pytest.raises(ValueError, match="latent_dim"):
        select_conditional(gen, x, c, n_candidates=3, latent_dim=0)
    with pytest.raises(ValueError, match="batch_size"):
        select_conditional(gen, x, c, batch_size=0, **kw)
    with pytest.raises(ValueError, match="latents"):
        select_conditional(gen, x, c, latents=torch.randn(5, 2, 3), **kw)
    with pytest.raises(ValueError, match="latent_sampler"):
        select_conditional(gen, x, c, latent_sampler=lambda n: torch.randn(n, 2), **kw)
    with pytest.raises(ValueError, match="generator output"):
        select_conditional(_gen(2, 3, 5), x, c, **kw)
    with pytest.raises(ValueError, match="rejection_radius"):
        select_conditional(gen, x, c, rejection_radius=-1.0, **kw)
    with pytest.raises(TypeError, match="generator"):
        select_conditional(None, x, c, **kw)
    with pytest.raises(ValueError, match="data"):
        select_conditional(gen, torch.full((5, 4), float("nan")), c, **kw)
    with pytest.raises(ValueError, match="generator output"):
        select_conditional(lambda cc, z: torch.full((z.shape[0], 4), float("inf")), x, c, **kw)


def test_make_condition():
    x = torch.rand(7, 64)
    c = make_condition("digits", x)
    img = x.reshape(7, 8, 8)
    want = (img[:, 0::2, 0::2] + img[:, 1::2, 0::2] + img[:, 0::2, 1::2] + img[:, 1::2, 1::2]) / 4
    assert c.shape == (7, 16)
    torch.testing.assert_close(c, want.reshape(7, 16))
    torch.testing.assert_close(make_condition("digits", img), c)
    p = torch.randn(9, 2)
    assert torch.equal(make_condition("grid-gmm", p), p[:, :1])
    with pytest.raises(ValueError, match="data_name"):
        make_condition("mnist", x)
    with pytest.raises(ValueError, match="x"):
        make_condition("digits", torch.rand(3, 63))
    with pytest.raises(ValueError, match="x"):
        make_condition("grid-gmm", torch.rand(3, 3))
    with pytest.raises(TypeError, match="x"):
        make_condition("digits", torch.ones(3, 64, dtype=torch.int64))


def test_default_config_and_to_dict():
    d = default_cimle_config("digits", epochs=3, seed=4)
    assert isinstance(d, CIMLEConfig) and d.epochs == 3 and d.seed == 4
    assert default_cimle_config("grid-gmm").out_act == "none"
    assert isinstance(d.to_dict()["hidden"], list)
    with pytest.raises(ValueError, match="data"):
        default_cimle_config("bimodal")
    with pytest.raises(ValueError, match="epochs"):
        default_cimle_config("digits", epochs=0)


def test_train_cimle_smoke_loss_decreases():
    g = torch.Generator().manual_seed(0)
    N = 240
    c = torch.rand(N, 1, generator=g) * 2 - 1
    mode = torch.randint(0, 2, (N, 1), generator=g).float() * 2 - 1
    x = torch.cat([c, mode + 0.05 * torch.randn(N, 1, generator=g)], 1)      # y bimodal given c
    cfg = CIMLEConfig(epochs=8, latent_dim=2, hidden=(32, 32), batch_size=32, lr=3e-3, lr_final=1e-3,
                      n_candidates=6, staleness=2, noise=0.0, out_act="none", select_bf16="off", seed=1)
    res = train_cimle(x, c, cfg, progress=False)
    assert len(res.loss) == 8 and len(res.select_dist2) == 4
    assert res.loss[-1] < 0.7 * res.loss[0]
    assert res.select_dist2[-1][1] < res.select_dist2[0][1]
    assert res.train_seconds > 0 and res.select_seconds > 0
    s = res.sample(c[:10], seed=3)
    assert s.shape == (10, 2) and s.dtype == torch.float32 and bool(torch.isfinite(s).all())
    assert torch.equal(s, res.sample(c[:10], seed=3))
    assert res.generator.training
    with pytest.raises(ValueError, match="cond"):
        res.sample(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="cond"):
        train_cimle(x, c[:5], cfg, progress=False)
    with pytest.raises(ValueError, match="config.n_candidates"):
        train_cimle(x, c, CIMLEConfig(n_candidates=0), progress=False)
    with pytest.raises(TypeError, match="config"):
        train_cimle(x, c, {"epochs": 1}, progress=False)


def test_conditional_generator_skip_and_prior():
    gen = ConditionalMLPGenerator(1, 2, 2, hidden=(8,), out_act="none", skip=True)
    with torch.no_grad():
        gen.net[-1].weight.zero_()
        gen.net[-1].bias.zero_()
    c, z = torch.randn(5, 1), torch.randn(5, 2)
    torch.testing.assert_close(gen(c, z), torch.cat([c, z[:, :1]], 1))    # x <- cond, y <- z_0
    assert ConditionalMLPGenerator(3, 2, 4, hidden=(8,)).skip is None
    with pytest.raises(ValueError, match="out_act"):
        ConditionalMLPGenerator(1, 2, 2, out_act="tanh")
    x, cnd = torch.rand(16, 2), torch.rand(16, 1)
    with pytest.raises(ValueError, match="prior"):
        train_cimle(x, cnd, CIMLEConfig(epochs=1, hidden=(4,), prior="cauchy"), progress=False)
    res = train_cimle(x, cnd, CIMLEConfig(epochs=2, latent_dim=2, hidden=(8,), n_candidates=3, prior="uniform", skip=True,
                                          out_act="none", select_bf16="off"), progress=False)
    s = res.sample(cnd, seed=0)
    assert s.shape == (16, 2) and bool(torch.isfinite(s).all())
