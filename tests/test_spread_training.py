"""Spread VAE, sigma-VAE helpers and learned spread (fastgen/spread/{vae,sigma_vae,learned}.py)."""
import math

import pytest
import torch

import fastgen
from fastgen.spread import (LearnedSpread, SpreadVAE, gaussian_kl_standard, nll_lower_bound, optimal_log_sigma,
                            optimal_sigma2, sigma_vae_nll, softclip, spread_vae_loss)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny shapes: OpenMP threads only contend on the shared 2-core CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- linear Gaussian
def _linear_model(dtype=torch.float64):
    W = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0], [0.5, 0.0]], dtype=dtype)    # W^T W diagonal
    b = torch.tensor([0.5, -1.0, 2.0, 3.0], dtype=dtype)
    return W, b


def _exact_posterior(y, W, b, sigma):
    Z = W.shape[1]
    cov = torch.linalg.inv(torch.eye(Z, dtype=y.dtype) + W.T @ W / sigma**2)
    m = (y - b) @ W @ cov.T / sigma**2
    return m, cov


@pytest.mark.parametrize("sigma", [0.3, 0.7, 2.0])
def test_spread_vae_elbo_is_exact_log_marginal_with_exact_posterior(sigma):
    # p~(y) = N(b, W W^T + sigma^2 I) for g(z) = W z + b. With q = the exact posterior, the
    # expected ELBO equals log p~(y): E_q ||y - W z - b||^2 = ||y - W m - b||^2 + tr(W C W^T).
    W, b = _linear_model()
    y = torch.randn(16, 4, dtype=torch.float64) * 2 + 1
    exact = torch.distributions.MultivariateNormal(b, W @ W.T + sigma**2 * torch.eye(4, dtype=torch.float64)).log_prob(y)
    m, cov = _exact_posterior(y, W, b, sigma)
    logvar = torch.log(torch.diagonal(cov)).expand_as(m)
    loss, nll, kl = spread_vae_loss(m @ W.T + b, y, m, logvar, sigma, reduction="none")
    elbo = -(loss + torch.trace(W @ cov @ W.T) / (2 * sigma**2))
    torch.testing.assert_close(elbo, exact, rtol=0, atol=1e-10)
    torch.testing.assert_close(loss, nll + kl)


def test_spread_vae_forward_monte_carlo_matches_log_marginal():
    # The module's one-sample -ELBO, averaged over many draws of z, with the exact posterior
    # encoder, is log p~(y): MC error bound 5 standard errors.
    sigma = 0.7
    W, b = _linear_model(torch.float32)

    class Enc(torch.nn.Module):
        def forward(self, yy):
            m, cov = _exact_posterior(yy.double(), W.double(), b.double(), sigma)
            return m.float(), torch.log(torch.diagonal(cov)).float().expand_as(m)

    class Gen(torch.nn.Module):
        def forward(self, z):
            return z @ W.T + b

    vae = SpreadVAE(Gen(), Enc(), sigma, latent_dim=2)
    y0 = torch.tensor([[1.0, 0.0, 2.5, 2.0]])
    y = y0.expand(20000, 4).contiguous()
    loss, nll, kl, recon = vae.elbo_terms(y, torch.Generator().manual_seed(0))
    exact = torch.distributions.MultivariateNormal(b.double(), (W @ W.T).double() + sigma**2 * torch.eye(4,
                                                   dtype=torch.float64)).log_prob(y0.double())
    se = loss.double().std() / math.sqrt(len(loss))
    assert abs(-loss.double().mean() - exact.item()) < 5 * se + 1e-4


def test_spread_vae_constants_and_gaussian_nll():
    # nll is -log N(y; recon, sigma^2 I) with every constant, per example.
    N, D = 5, 3
    r, y = torch.randn(N, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    mu, lv = torch.randn(N, 2, dtype=torch.float64), torch.randn(N, 2, dtype=torch.float64)
    _, nll, kl = spread_vae_loss(r, y, mu, lv, s, reduction="none")
    ref = -torch.distributions.Normal(r, s).log_prob(y).sum(1)
    torch.testing.assert_close(nll, ref)
    ref_kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, torch.exp(0.5 * lv)),
                                               torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl, ref_kl)
    torch.testing.assert_close(gaussian_kl_standard(mu, lv), ref_kl)


def test_spread_vae_trains_and_is_reproducible():
    def run():
        torch.manual_seed(0)
        enc = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
        gen = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))
        vae = SpreadVAE(gen, enc, 0.3, latent_dim=2)
        opt = torch.optim.Adam(vae.parameters(), 1e-2)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(128, 2, generator=g) * torch.tensor([2.0, 0.5]) + 3
        losses = []
        for _ in range(100):
            out = vae(x, generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        return losses, vae.sample(8, generator=torch.Generator().manual_seed(2))

    l1, s1 = run()
    l2, s2 = run()
    assert l1 == l2 and torch.equal(s1, s2)
    assert sum(l1[-10:]) / 10 < sum(l1[:10]) / 10 - 2.0
    assert s1.shape == (8, 2)


def test_spread_vae_bad_input():
    enc, gen = torch.nn.Linear(3, 4), torch.nn.Linear(2, 3)
    with pytest.raises(ValueError, match="sigma"):
        SpreadVAE(gen, enc, -1.0, latent_dim=2)
    with pytest.raises(TypeError, match="sigma"):
        SpreadVAE(gen, enc, "a", latent_dim=2)
    with pytest.raises(ValueError, match="latent_dim"):
        SpreadVAE(gen, enc, 1.0, latent_dim=0)
    vae = SpreadVAE(gen, enc, torch.ones(5), latent_dim=2)
    with pytest.raises(ValueError, match="sigma"):
        vae(torch.randn(4, 3))
    with pytest.raises(ValueError, match="recon"):
        spread_vae_loss(torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 1), torch.randn(2, 1), 1.0)
    with pytest.raises(ValueError, match="reduction"):
        spread_vae_loss(torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 1), torch.randn(2, 1), 1.0, reduction="x")


# ----------------------------------------------------------------------------- sigma-VAE
def test_optimal_sigma2_is_the_argmin_of_the_nll():
    r, x = torch.randn(64, 10, dtype=torch.float64), torch.randn(64, 10, dtype=torch.float64)
    s2 = optimal_sigma2(r, x)
    torch.testing.assert_close(s2, ((x - r) ** 2).mean())
    ls = (0.5 * torch.log(s2)).detach().requires_grad_(True)
    nll = sigma_vae_nll(r, x, ls)
    (g,) = torch.autograd.grad(nll, ls)
    assert abs(g.item()) < 1e-10                          # stationary in sigma
    for d in (-0.05, 0.05):                               # and a minimum
        assert sigma_vae_nll(r, x, (ls + d).detach()) > nll
    # closed form at the optimum: D/2 (log(2 pi MSE) + 1) per example
    torch.testing.assert_close(nll, 10 * 0.5 * (torch.log(2 * math.pi * s2) + 1))
    # per-example and per-feature optima
    torch.testing.assert_close(optimal_sigma2(r, x, dim=-1), ((x - r) ** 2).mean(-1))
    torch.testing.assert_close(optimal_sigma2(r, x, dim=0, keepdim=True), ((x - r) ** 2).mean(0, keepdim=True))


def test_softclip_floor():
    x = torch.linspace(-50, 10, 200, dtype=torch.float64, requires_grad=True)
    y = softclip(x, -6.0)
    assert bool((y >= -6.0).all()) and bool((y[:10] - (-6.0) < 1e-15).all())
    assert bool((y[50:] > -6.0).all())
    assert bool((torch.diff(y[50:]) > 0).all()) and bool((torch.diff(y) >= 0).all())
    torch.testing.assert_close(y[-1], x[-1] + torch.nn.functional.softplus(-(x[-1] + 6)))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert bool((g > 0).all()) and bool((g <= 1).all())
    with pytest.raises(ValueError, match="min_log_sigma"):
        softclip(x, float("nan"))


def test_optimal_log_sigma_zero_mse_hits_floor_without_nan():
    x = torch.randn(8, 4, requires_grad=True)
    ls = optimal_log_sigma(x, x.detach(), min_log_sigma=-3.0)
    assert ls.item() == pytest.approx(-3.0)
    nll = sigma_vae_nll(x, x.detach(), min_log_sigma=-3.0)
    nll.backward()
    assert torch.isfinite(nll) and bool(torch.isfinite(x.grad).all())
    assert nll.item() >= nll_lower_bound(4, -3.0) - 1e-4
    assert nll.item() == pytest.approx(nll_lower_bound(4, -3.0), abs=1e-4)


def test_sigma_vae_nll_matches_torch_and_shapes():
    r, x = torch.randn(6, 2, 3), torch.randn(6, 2, 3)
    ls = torch.randn(6)
    ref = torch.nn.functional.gaussian_nll_loss(r.reshape(6, -1), x.reshape(6, -1),
                                                torch.exp(2 * ls)[:, None].expand(6, 6), full=True,
                                                reduction="sum") / 6
    torch.testing.assert_close(sigma_vae_nll(r, x, ls), ref, rtol=1e-5, atol=1e-5)
    assert sigma_vae_nll(r, x, reduction="none").shape == (6,)
    with pytest.raises(ValueError, match="log_sigma"):
        sigma_vae_nll(r, x, torch.zeros(5))
    with pytest.raises(ValueError, match="shape"):
        optimal_sigma2(r, x[:, :1])
    with pytest.raises(TypeError, match="recon"):
        optimal_sigma2([1.0], x)
    with pytest.raises(ValueError, match="num_features"):
        nll_lower_bound(0)


# ----------------------------------------------------------------------------- learned spread
def test_learned_spread_floor_and_volume():
    sp = LearnedSpread(3, sigma=torch.tensor([0.5, 1.0, 2.0]), min_sigma=0.1)
    torch.testing.assert_close(sp.sigma, torch.tensor([0.5, 1.0, 2.0]))
    with torch.no_grad():
        sp.logits.copy_(torch.tensor([-3.0, 1.0, 0.5]))
    s = sp.sigma
    assert bool((s > 0.1).all())
    with torch.no_grad():
        sp.logits.copy_(torch.tensor([-200.0, 3.0, 0.5]))
    assert bool((sp.sigma >= 0.1).all()) and sp.sigma[0].item() == pytest.approx(0.1)
    with torch.no_grad():
        sp.logits.copy_(torch.tensor([-3.0, 1.0, 0.5]))
    vol0 = torch.log(torch.tensor([0.4, 0.9, 1.9])).sum()
    torch.testing.assert_close(torch.log(s - 0.1).sum(), vol0, rtol=1e-5, atol=1e-4)
    free = LearnedSpread(2, sigma=1.0, min_sigma=0.2, constraint="none")
    with torch.no_grad():
        free.logits.fill_(-200.0)
    assert bool((free.sigma >= 0.2).all())
    for bad, match in ((dict(dim=0), "dim"), (dict(dim=2, sigma=0.05, min_sigma=0.1), "sigma"),
                       (dict(dim=2, constraint="x"), "constraint"), (dict(dim=2, kind="uniform"), "kind"),
                       (dict(dim=2, min_sigma=-1.0), "min_sigma"), (dict(dim=2, sigma=torch.ones(3)), "sigma")):
        with pytest.raises((ValueError, TypeError), match=match):
            LearnedSpread(**bad)


def test_learned_spread_divergence_matches_closed_form():
    # data delta at (2, 0), model delta at (0, 0): KL = sum_j d_j^2 / (2 sigma_j^2) = 2 / sigma_0^2
    sp = LearnedSpread(2, sigma=torch.tensor([0.8, 1.5]), min_sigma=0.05)
    data = torch.tensor([[2.0, 0.0]], dtype=torch.float64).expand(20000, 2).contiguous()
    smp = torch.zeros(1, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    est = sp.divergence(smp, data, generator=g).item()
    exact = float(fastgen.spread.kl_two_deltas(torch.tensor([2.0, 0.0]), torch.zeros(2), sp.sigma.detach()).sum())
    se = (2.0 / 0.8) / math.sqrt(20000)     # std of d * eps / sigma
    assert abs(est - exact) < 5 * se


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_learned_spread_game_moves_noise_off_the_mismatched_dimension(kind):
    # The model differs from the data only in dimension 0: maximising the divergence at fixed
    # volume lowers sigma_0 and raises sigma_1; the generator loss does not touch sigma.
    torch.manual_seed(0)
    sp = LearnedSpread(2, sigma=1.0, min_sigma=0.05, kind=kind)
    opt = torch.optim.Adam(sp.parameters(), lr=0.05)
    data = torch.tensor([[1.5, 0.0]]).expand(512, 2).contiguous()
    theta = torch.zeros(1, 2, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        g_loss, s_loss = sp.game_losses(theta, data, generator=g)
        opt.zero_grad()
        theta.grad = None
        (g_loss + s_loss).backward()
        opt.step()
    s = sp.sigma.detach()
    assert s[0] < 0.7 < 1.3 < s[1]
    assert bool((s > 0.05).all())
    torch.testing.assert_close(torch.log(s - 0.05).sum(), 2 * torch.log(torch.tensor(0.95)), rtol=1e-5, atol=1e-4)
    # generator loss reaches theta only; spread loss reaches the spread only
    g_loss, s_loss = sp.game_losses(theta, data, generator=g)
    gl_grads = torch.autograd.grad(g_loss, [theta, sp.logits], allow_unused=True)
    assert gl_grads[1] is None and gl_grads[0] is not None and gl_grads[0][0, 0] < 0
    sl_grads = torch.autograd.grad(s_loss, [theta, sp.logits], allow_unused=True)
    assert sl_grads[0] is None and sl_grads[1] is not None


def test_learned_spread_reproducible():
    sp = LearnedSpread(3, sigma=0.5)
    x, d = torch.randn(16, 3), torch.randn(32, 3)
    a = sp.divergence(x, d, generator=torch.Generator().manual_seed(3))
    b = sp.divergence(x, d, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="dim"):
        sp.divergence(torch.randn(4, 2), torch.randn(4, 2))


# ----------------------------------------------------------------------------- training loops
@pytest.mark.parametrize("method", ["spread", "spread-vae"])
def test_training_loops_reproducible_and_decreasing(method):
    from fastgen.spread.train import SpreadConfig, train_spread, train_spread_vae

    fn = train_spread if method == "spread" else train_spread_vae
    x = torch.randn(256, 2, generator=torch.Generator().manual_seed(0)) * 0.3 + 2.0
    cfg = SpreadConfig(epochs=20, hidden=(32, 32), batch_size=128, n_samples=256, sigma_start=0.5, sigma_end=0.2,
                       latent_dim=2)
    r1 = fn(x, cfg, progress=False)
    r2 = fn(x, cfg, progress=False)
    assert r1.loss == r2.loss and torch.equal(r1.sample(16, seed=3), r2.sample(16, seed=3))
    assert r1.loss[-1] < r1.loss[0] and len(r1.loss) == 20 and r1.sigma[-1] == pytest.approx(0.2, rel=1e-6)
    assert r1.sample(16).shape == (16, 2)
    with pytest.raises(ValueError, match="sigma"):
        fn(x, SpreadConfig(sigma_start=0.0), progress=False)


def test_default_config():
    from fastgen.spread.train import default_config

    c = default_config("spread", "grid-gmm")
    assert (c.kind, c.prior, c.skip, c.latent_dim) == ("laplace", "uniform", True, 2)
    c = default_config("spread-vae", "digits", epochs=3, seed=5)
    assert (c.epochs, c.seed, c.out_act, c.kind) == (3, 5, "sigmoid", "gaussian")
    with pytest.raises(ValueError, match="method"):
        default_config("imle", "digits")
    with pytest.raises(ValueError, match="data"):
        default_config("spread", "mnist")


def test_config_checks():
    from fastgen.spread.train import SpreadConfig, train_spread, train_spread_vae

    x = torch.randn(32, 2)
    with pytest.raises(ValueError, match="prior"):
        train_spread(x, SpreadConfig(prior="laplace"), progress=False)
    with pytest.raises(ValueError, match="anneal"):
        train_spread(x, SpreadConfig(anneal=0.0), progress=False)
    with pytest.raises(ValueError, match="prior"):
        train_spread_vae(x, SpreadConfig(prior="uniform"), progress=False)


def test_anneal_holds_sigma_end_and_uniform_prior_samples():
    from fastgen.spread.train import SpreadConfig, train_spread

    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(1))
    cfg = SpreadConfig(epochs=8, hidden=(16,), batch_size=32, n_samples=32, sigma_start=0.8, sigma_end=0.2,
                       latent_dim=2, anneal=0.5, prior="uniform", skip=True, num_draws=2, antithetic=True)
    r = train_spread(x, cfg, progress=False)
    # 16 steps, annealed over the first half: sigma reaches sigma_end by step 8 and stays there
    assert r.sigma[4] == pytest.approx(0.2, rel=1e-6) and r.sigma[-1] == pytest.approx(0.2, rel=1e-6)
    assert r.sigma[0] > 0.2
    assert [e["step"] for e in r.log] == [0, 15] and r.log[0]["sigma"] == pytest.approx(0.8)
    # skip initialised to the identity: the generator is a square of side 2 sqrt(3) plus the MLP's output
    assert r.generator.skip is not None and r.sample(8).shape == (8, 2)


@pytest.mark.parametrize("method", ["spread", "spread-vae"])
def test_grid_default_config_covers_all_25_modes(method):
    # `fastgen train --method spread|spread-vae --data grid-gmm` (seed 0): a deterministic generator
    # trained by spread divergence (or as a spread VAE) covers the 25 modes. Measured 25/25:
    # spread on seeds 0-5 (every mode >= 1.9 % of the samples, the threshold is 1 %),
    # high-quality fraction 0.54-0.68; spread-vae on seeds 0-2, 0.57-0.59; 15-35 s of CPU each.
    from fastgen import data as datasets
    from fastgen import metrics
    from fastgen.spread.train import default_config, train_spread, train_spread_vae

    split = datasets.load("grid-gmm", seed=0)
    scale = float(split.x_train.std())
    fn = train_spread if method == "spread" else train_spread_vae
    r = fn(torch.from_numpy(split.x_train) / scale, default_config(method, "grid-gmm"), progress=False)
    m = metrics.grid_modes((r.sample(2500, seed=1234) * scale).numpy(), datasets.grid_centres(), datasets.GRID_STD)
    assert m["modes_covered"] >= 24, m
    assert m["high_quality_fraction"] > 0.45, m
