"""Spread divergence (seed 001): closed forms against Monte-Carlo estimates built from the fused
ops (spread_noise draws y ~ p*K, spread_log_likelihood gives log p*K(y) and log q*K(y)), within
stated statistical bounds (5 standard errors of a fixed-seed estimate), and
nn.SpreadDivergenceLoss: a delta model converges to the data delta, learned sigma, errors."""
import math

import pytest
import torch
from scipy.special import ndtri

import fastgen
from fastgen.nn import SpreadDivergenceLoss
from fastgen.spread import kl_gaussians, kl_two_deltas

KINDS = ("gaussian", "laplace")


# ----------------------------------------------------------------------------- closed forms
def test_closed_form_values():
    assert kl_two_deltas(0.0, 1.0, 0.5) == pytest.approx(2.0)
    assert kl_two_deltas(1.0, 0.0, 0.5, "laplace") == pytest.approx(2.0 + math.exp(-2.0) - 1.0)
    assert kl_two_deltas(3.0, 3.0, 0.1, "laplace") == 0.0
    # tiny separations: |d|/b + expm1(-|d|/b) ~ (d/b)^2 / 2 without cancellation
    assert kl_two_deltas(0.0, 1e-6, 1.0, "laplace") == pytest.approx(0.5e-12, rel=1e-5)
    # Gaussians: equal laws -> 0; deltas (s = 0) reduce to the two-delta form
    assert kl_gaussians(0.3, 1.0, 0.3, 1.0, 0.5) == pytest.approx(0.0, abs=1e-15)
    assert kl_gaussians(0.0, 0.0, 1.0, 0.0, 0.5) == pytest.approx(kl_two_deltas(0.0, 1.0, 0.5))
    v1, v2 = 0.8**2 + 0.6**2, 1.5**2 + 0.6**2
    want = 0.5 * (math.log(v2 / v1) + (v1 + 0.8**2) / v2 - 1)
    assert kl_gaussians(0.5, 0.8, -0.3, 1.5, 0.6) == pytest.approx(want)
    # broadcasting over tensors, float in -> float out, tensor in -> tensor out
    t = kl_two_deltas(torch.zeros(3, 1), torch.arange(4.0), torch.tensor(2.0))
    assert isinstance(t, torch.Tensor) and t.shape == (3, 4)
    torch.testing.assert_close(t[0], torch.arange(4.0) ** 2 / 8)
    assert isinstance(kl_two_deltas(0.0, 1.0, 1.0), float)
    g = kl_gaussians(torch.zeros(5), 1.0, torch.linspace(-1, 1, 5), torch.full((5,), 2.0), 0.3)
    assert g.shape == (5,) and bool((g > 0).all())


def test_closed_form_errors():
    with pytest.raises(ValueError, match="sigma"):
        kl_two_deltas(0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        kl_two_deltas(0.0, 1.0, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="sigma"):
        kl_two_deltas(0.0, 1.0, float("nan"))
    with pytest.raises(ValueError, match="uniform"):
        kl_two_deltas(0.0, 1.0, 1.0, kind="uniform")
    with pytest.raises(ValueError, match="kind"):
        kl_two_deltas(0.0, 1.0, 1.0, kind="cauchy")
    with pytest.raises(TypeError, match="mu_p"):
        kl_two_deltas("0", 1.0, 1.0)
    with pytest.raises(ValueError, match="sigma"):
        kl_gaussians(0.0, 1.0, 0.0, 1.0, -0.5)
    with pytest.raises(ValueError, match="s1"):
        kl_gaussians(0.0, -1.0, 0.0, 1.0, 0.5)
    with pytest.raises(ValueError, match="s2"):
        kl_gaussians(0.0, 1.0, 0.0, torch.tensor([1.0, -0.1]), 0.5)
    with pytest.raises(TypeError, match="m2"):
        kl_gaussians(0.0, 1.0, None, 1.0, 0.5)


# ---------------------------------------------------------------- Monte Carlo from the ops
def _mc(diff: torch.Tensor):
    d = diff.double()
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


@pytest.mark.parametrize("kind", KINDS)
def test_two_deltas_monte_carlo(kind):
    # p = delta(mu_p), q = delta(mu_q) in D = 3; y ~ p*K; KL = E[log p*K(y) - log q*K(y)], both
    # log-densities exact (one sample each). Closed form: the sum over dims.
    mu_p = torch.tensor([0.3, -1.0, 2.0])
    mu_q = torch.tensor([1.1, -0.2, 2.5])
    sigma, M = 0.7, 40000
    g = torch.Generator().manual_seed(10)
    y = fastgen.spread_noise(mu_p.expand(M, 3), sigma, kind=kind, generator=g)
    lp = fastgen.spread_log_likelihood(y, mu_p[None], sigma, kind=kind)
    lq = fastgen.spread_log_likelihood(y, mu_q[None], sigma, kind=kind)
    est, se = _mc(lp - lq)
    want = float(kl_two_deltas(mu_p, mu_q, sigma, kind).sum())
    assert abs(est - want) < 5 * se, (est, want, se)
    # per-dimension sigma: the same with a [D] spread
    s = torch.tensor([0.5, 1.0, 2.0])
    y = fastgen.spread_noise(mu_p.expand(M, 3), s, kind=kind, generator=g)
    est, se = _mc(fastgen.spread_log_likelihood(y, mu_p[None], s, kind=kind)
                  - fastgen.spread_log_likelihood(y, mu_q[None], s, kind=kind))
    want = float(kl_two_deltas(mu_p, mu_q, s, kind).sum())
    assert abs(est - want) < 5 * se, (est, want, se)


def test_gaussians_monte_carlo():
    # p = N(m1, s1^2), q = N(m2, s2^2) in 1-D, Gaussian spread sigma. y = (m1 + s1 z) + sigma eps
    # with spread_noise; log p*K and log q*K from spread_log_likelihood over S = 2000 quantile
    # points of p and q (a quadrature of the convolution whose bias is < 1e-3 nats here).
    m1, s1, m2, s2, sigma = 0.5, 0.8, -0.3, 1.5, 0.6
    S, M = 2000, 20000
    u = (torch.arange(S, dtype=torch.float64) + 0.5) / S
    q01 = torch.from_numpy(ndtri(u.numpy()))
    xp = (m1 + s1 * q01).float()[:, None]
    xq = (m2 + s2 * q01).float()[:, None]
    g = torch.Generator().manual_seed(11)
    x = m1 + s1 * torch.randn(M, 1, generator=g)
    y = fastgen.spread_noise(x, sigma, generator=g)
    lp = fastgen.spread_log_likelihood(y, xp, sigma)
    lq = fastgen.spread_log_likelihood(y, xq, sigma)
    est, se = _mc(lp - lq)
    want = kl_gaussians(m1, s1, m2, s2, sigma)
    assert abs(est - want) < 5 * se + 1e-3, (est, want, se)
    # the quadrature log-densities against the exact N(y; m, s^2 + sigma^2)
    sd = math.sqrt(s1**2 + sigma**2)
    exact = torch.distributions.Normal(m1, sd).log_prob(y.double()[:, 0])
    central = (y[:, 0] - m1).abs() < 3 * sd  # the quantile grid stops at 3.5 s1: tails are coarser
    assert (lp.double() - exact)[central].abs().max() < 2e-3


# ----------------------------------------------------------------- SpreadDivergenceLoss
@pytest.mark.parametrize("kind", KINDS)
def test_delta_model_converges_to_data_delta(kind):
    # seed 001: q = delta(mu) fitted to p = delta(x0) by minimising -E log q*K(x0 + noise)
    x0 = torch.tensor([[3.0, -2.0, 0.5]])
    mu = torch.nn.Parameter(torch.zeros(1, 3))
    loss_fn = SpreadDivergenceLoss(1.0, kind=kind)
    opt = torch.optim.Adam([mu], lr=0.1)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = loss_fn(mu, x0.expand(256, 3), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 1.0
    assert (mu.detach() - x0).abs().max() < 0.2
    # at the optimum the cross-entropy is the entropy of K: 3/2 log(2 pi e) or 3 (1 + log 2)
    h = 1.5 * math.log(2 * math.pi * math.e) if kind == "gaussian" else 3 * (1 + math.log(2))
    assert abs(sum(losses[-20:]) / 20 - h) < 0.3


def test_loss_value_and_shapes():
    # image-shaped data and samples are flattened; the loss is -mean log q*K(y)
    torch.manual_seed(0)
    samples = torch.randn(40, 2, 3, 3, requires_grad=True)
    data = torch.randn(25, 2, 3, 3)
    loss_fn = SpreadDivergenceLoss(0.8)
    g = torch.Generator().manual_seed(1)
    loss = loss_fn(samples, data, generator=g)
    g = torch.Generator().manual_seed(1)
    y = fastgen.spread_noise(data.reshape(25, -1), torch.tensor(0.8), generator=g)
    want = -fastgen.spread_log_likelihood(y, samples.reshape(40, -1), 0.8).mean()
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert samples.grad.shape == samples.shape and torch.isfinite(samples.grad).all()
    # several draws and antithetic pairs: unbiased estimates of the same expectation
    vals = {}
    for kw in ({}, {"num_draws": 4}, {"antithetic": True}):
        lf = SpreadDivergenceLoss(0.8, **kw)
        gg = torch.Generator().manual_seed(2)
        vals[str(kw)] = torch.stack([lf(samples.detach(), data, generator=gg) for _ in range(20)])
    means = [float(v.mean()) for v in vals.values()]
    assert max(means) - min(means) < 0.5


def test_learned_sigma_floor_and_gradients():
    torch.manual_seed(0)
    lf = SpreadDivergenceLoss(torch.tensor([0.5, 1.0, 2.0]), learn_sigma=True, min_sigma=0.05)
    assert isinstance(lf.log_excess, torch.nn.Parameter)
    torch.testing.assert_close(lf.sigma.detach(), torch.tensor([0.5, 1.0, 2.0]))
    samples = torch.randn(30, 3, requires_grad=True)
    data = torch.randn(20, 3)
    lf(samples, data).backward()
    assert lf.log_excess.grad is not None and torch.isfinite(lf.log_excess.grad).all()
    assert samples.grad is not None
    # the floor: however far log_excess is pushed down, sigma >= min_sigma
    with torch.no_grad():
        lf.log_excess.fill_(-80.0)
    assert bool((lf.sigma >= 0.05).all()) and bool((lf.sigma < 0.0501).all())
    # the divergence estimate of two deltas matches the closed form (what sigma maximises)
    lf2 = SpreadDivergenceLoss(0.7, learn_sigma=True)
    mu_p, mu_q = torch.tensor([0.3, -1.0]), torch.tensor([1.1, -0.2])
    # (log p*K(y) uses the data itself as the sample set: M x M pairs, M = 4000)
    div = lf2.divergence(mu_q[None], mu_p.expand(4000, 2), generator=torch.Generator().manual_seed(3))
    want = float(kl_two_deltas(mu_p, mu_q, 0.7).sum())
    se = math.sqrt(float(((mu_p - mu_q) ** 2).sum())) / 0.7 / math.sqrt(4000)  # sd of the log ratio |d| / sigma
    assert abs(div.item() - want) < 5 * se
    div.backward()
    # d KL / d sigma = -(d^2 / sigma^3) summed; through log_excess: times (sigma - min_sigma)
    d2 = float(((mu_p - mu_q) ** 2).sum())
    assert float(lf2.log_excess.grad) == pytest.approx(-d2 / 0.7**3 * (0.7 - 1e-3), rel=0.1)


def test_loss_errors():
    with pytest.raises(ValueError, match="uniform"):
        SpreadDivergenceLoss(1.0, kind="uniform")
    with pytest.raises(ValueError, match="sigma"):
        SpreadDivergenceLoss(0.0)
    with pytest.raises(ValueError, match="sigma"):
        SpreadDivergenceLoss(torch.tensor([1.0, -1.0]))
    with pytest.raises(TypeError, match="sigma"):
        SpreadDivergenceLoss("1")
    with pytest.raises(ValueError, match="min_sigma"):
        SpreadDivergenceLoss(0.01, learn_sigma=True, min_sigma=0.1)
    with pytest.raises(ValueError, match="num_draws"):
        SpreadDivergenceLoss(1.0, num_draws=0)
    lf = SpreadDivergenceLoss(torch.ones(4))
    with pytest.raises(ValueError, match="trailing shape"):
        lf(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="sigma"):
        lf(torch.randn(3, 5), torch.randn(3, 5))
