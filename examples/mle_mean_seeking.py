"""Maximum likelihood is mean-seeking (zero-avoiding); reverse KL is mode-seeking.

Seeds 000 (Salah, "Why maximum likelihood-based training may lead to the generation of
unrealistic samples", Preferred.AI 2020) and 003 ("The dual nature of MLE and KL divergence").
Data: q = 0.5 N(0, 1) + 0.5 N(16, 1). Model: one Gaussian N(mu, sigma^2).

* Maximum likelihood = min KL(q || p_theta). The article's estimates: mu* = 8, sigma* = 8.06
  (population values: mu = 8, sigma = sqrt(1 + 8^2) = sqrt(65) = 8.0623). Reproduced twice: the
  closed form (sample mean and std) and gradient descent on fastgen.gaussian_nll_loss (full
  NLL, log-variance parametrisation, L-BFGS).
* Reverse KL(p_theta || q), minimised by gradient descent with a 100-node Gauss-Hermite
  quadrature of E_{p_theta}[log p_theta - log q] (deterministic, no Monte-Carlo noise): it locks
  onto one mode, N(0, 1) or N(16, 1) depending on the start, with KL = log 2 (the model
  ignores half of q's mass).
* "Unrealistic samples": the fraction of model samples more than 3 std of q's components away
  from both modes: 0.27 % for q itself, ~64 % for the ML fit, 0.27 % for the reverse-KL fit.

Writes <out>/mle_mean_seeking.png and <out>/mle_mean_seeking.json. About 2 s on a laptop CPU.
"""
from __future__ import annotations

import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _util  # noqa: E402

import fastgen  # noqa: E402

NAME = "mle_mean_seeking"
MODES = (0.0, 16.0)


def log_q(x: torch.Tensor) -> torch.Tensor:
    """log density of 0.5 N(0, 1) + 0.5 N(16, 1)."""
    comps = torch.stack([-0.5 * (x - m) ** 2 for m in MODES], 0) - 0.5 * math.log(2 * math.pi)
    return torch.logsumexp(comps, 0) - math.log(2.0)


def sample_q(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    comp = torch.randint(0, 2, (n,), generator=g).double()
    return comp * MODES[1] + torch.randn(n, generator=g, dtype=torch.float64)


def fit_ml_gradient(x: torch.Tensor, max_iter: int = 100):
    """Maximum likelihood by L-BFGS on the full Gaussian NLL (fastgen.gaussian_nll_loss,
    full=True, log_var=True), from mu = 2, sigma = 1."""
    mu = torch.tensor(2.0, requires_grad=True)
    log_var = torch.tensor(0.0, requires_grad=True)
    opt = torch.optim.LBFGS([mu, log_var], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)
    xt = x.float().reshape(-1, 1)

    def closure():
        opt.zero_grad()
        nll = fastgen.gaussian_nll_loss(mu.expand_as(xt), xt, log_var.reshape(1, 1).expand(len(xt), 1), full=True,
                                        log_var=True)
        nll.backward()
        return nll

    opt.step(closure)
    nll = closure()
    return float(mu.detach()), float(torch.exp(0.5 * log_var.detach())), float(nll.detach())


def reverse_kl(mu: torch.Tensor, log_sigma: torch.Tensor, nodes: torch.Tensor, weights: torch.Tensor):
    """KL(N(mu, sigma^2) || q) = -H(N) - E_N[log q], E_N by Gauss-Hermite quadrature."""
    sigma = torch.exp(log_sigma)
    x = mu + math.sqrt(2.0) * sigma * nodes
    e_log_q = (weights * log_q(x)).sum() / math.sqrt(math.pi)
    entropy = 0.5 * math.log(2 * math.pi * math.e) + log_sigma
    return -entropy - e_log_q


def fit_reverse(mu0: float, sigma0: float, steps: int, lr: float = 0.1):
    t, w = np.polynomial.hermite.hermgauss(100)
    nodes, weights = torch.tensor(t), torch.tensor(w)
    mu = torch.tensor(mu0, dtype=torch.float64, requires_grad=True)
    ls = torch.tensor(math.log(sigma0), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([mu, ls], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        kl = reverse_kl(mu, ls, nodes, weights)
        kl.backward()
        opt.step()
    with torch.no_grad():
        kl = reverse_kl(mu, ls, nodes, weights)
    return float(mu.detach()), float(torch.exp(ls.detach())), float(kl)


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def unrealistic_fraction(mu: float, sigma: float, k: float = 3.0) -> float:
    """P_{N(mu, sigma^2)}(x more than k from both modes), exactly (normal cdf)."""
    a, b = MODES
    # the set is (-inf, a - k) u (a + k, b - k) u (b + k, inf) when the modes are > 2k apart
    cdf = lambda v: _phi((v - mu) / sigma)  # noqa: E731
    return cdf(a - k) + (cdf(b - k) - cdf(a + k)) + (1.0 - cdf(b + k))


def mixture_unrealistic_fraction(k: float = 3.0) -> float:
    return 0.5 * (unrealistic_fraction(MODES[0], 1.0, k) + unrealistic_fraction(MODES[1], 1.0, k))


def main(argv=None) -> dict:
    p = _util.parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="data samples from q")
    p.add_argument("--steps", type=int, default=1000, help="Adam steps of each reverse-KL fit")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    x = sample_q(a.n, a.seed)
    mu_cf, sigma_cf = float(x.mean()), float(x.std(unbiased=False))
    mu_gd, sigma_gd, nll_gd = fit_ml_gradient(x)
    rev = [fit_reverse(m0, 3.0, a.steps) for m0 in (5.0, 11.0)]
    res = {
        "article": {"mu": 8.0, "sigma": 8.06, "source": "seed 000 (Salah 2020), seed 003"},
        "population_ml": {"mu": 8.0, "sigma": math.sqrt(65.0)},
        "n": a.n, "seed": a.seed, "steps": a.steps,
        "ml_closed_form": {"mu": mu_cf, "sigma": sigma_cf},
        "ml_gradient_fastgen_nll": {"mu": mu_gd, "sigma": sigma_gd, "final_nll_nats": nll_gd},
        "ml_q_density_at_model_mode": math.exp(float(log_q(torch.tensor(mu_cf, dtype=torch.float64)))),
        "ml_model_density_at_its_mode": 1.0 / (math.sqrt(2 * math.pi) * sigma_cf),
        "reverse_kl_fits": [{"init_mu": m0, "mu": m, "sigma": s, "kl": k} for m0, (m, s, k) in zip((5.0, 11.0), rev)],
        "reverse_kl_expected": {"mu": list(MODES), "sigma": 1.0, "kl": math.log(2.0)},
        "unrealistic_fraction_3std": {"data": mixture_unrealistic_fraction(),
                                      "ml_fit": unrealistic_fraction(mu_cf, sigma_cf),
                                      "reverse_kl_fit": unrealistic_fraction(rev[0][0], rev[0][1])},
    }
    res["seconds"] = round(time.perf_counter() - t0, 2)

    plt = _util.plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    grid = torch.linspace(-25, 41, 2000, dtype=torch.float64)
    ax.hist(x.numpy(), bins=200, density=True, color="0.85", label=f"data ({a.n} samples)")
    ax.plot(grid, torch.exp(log_q(grid)), "C0", lw=1.5, label="q = 0.5 N(0,1) + 0.5 N(16,1)")

    def npdf(m, s):
        return torch.exp(-0.5 * ((grid - m) / s) ** 2) / (math.sqrt(2 * math.pi) * s)

    ax.plot(grid, npdf(mu_cf, sigma_cf), "C1", lw=2,
            label=f"max likelihood = min KL(q||p): mu={mu_cf:.2f}, sigma={sigma_cf:.2f}")
    for i, (m, s, k) in enumerate(rev):
        ax.plot(grid, npdf(m, s), "C2--" if i == 0 else "C3--", lw=1.2,
                label=f"min KL(p||q) from mu0={(5.0, 11.0)[i]:g}: mu={m:.2f}, sigma={s:.2f}, KL={k:.3f}")
    ax.set_ylim(0, 0.62)
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("ML is mean-seeking (seeds 000/003); reverse KL is mode-seeking", fontsize=9)
    _util.save(fig, a.out, NAME, res, dpi=110)
    print(f"ML fit: mu = {mu_cf:.3f}, sigma = {sigma_cf:.3f} (article: 8, 8.06); gradient on fastgen NLL: "
          f"mu = {mu_gd:.3f}, sigma = {sigma_gd:.3f}")
    for m0, (m, s, k) in zip((5.0, 11.0), rev):
        print(f"reverse KL from mu0 = {m0:g}: mu = {m:.3f}, sigma = {s:.3f}, KL = {k:.4f} (log 2 = {math.log(2):.4f})")
    print(f"wrote {a.out}/{NAME}.png, {NAME}.json ({res['seconds']} s)")
    return res


if __name__ == "__main__":
    main()
