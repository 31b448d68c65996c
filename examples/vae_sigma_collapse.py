"""A VAE with a learned decoder variance: sigma -> 0 and the likelihood grows without bound;
the sigma-VAE helpers (analytic sigma^2 = MSE with a soft floor on log sigma) stay bounded.

Seed 002 (Kim, "Maximum likelihood is meaningless": "the variance of the decoder approached
zero ... the loss goes [down] if only perfect matching is possible"); sigma-VAE: Rybkin,
Daniilidis & Levine 2021 (arXiv 2006.13202); spread data: seed 001.

Data: N points on a closed 1-D curve in D = 8 dimensions, x(t) = (cos t, sin t, cos 2t, ...,
sin 4t), t ~ U(0, 2 pi): a distribution with zero volume, like images on a low-dimensional
manifold. A VAE (MLP encoder / decoder, latent Z = 2) is trained full-batch on the exact ELBO
(every constant, via fastgen.gaussian_nll_loss) in three ways:

A. "learned sigma": log sigma is a free parameter trained with the rest (the textbook
   heteroscedastic-decoder VAE). The decoder reconstructs ever better, sigma follows the MSE
   down, and -ELBO ~ D log sigma keeps falling: a straight line against the step, no plateau.
B. "sigma-VAE, floor": sigma = sqrt(MSE) computed analytically
   (fastgen.spread.optimal_log_sigma) with the soft floor log sigma >= min_log_sigma. sigma
   settles on the floor and -ELBO is bounded below by D (min_log_sigma + 1/2 log 2 pi)
   (fastgen.spread.nll_lower_bound).
C. "sigma-VAE, spread data": the same analytic sigma (floor far away, -6) on spread data
   y = x + N(0, s^2 I), fresh noise every step (seed 001): the noise cannot be reconstructed, so
   the optimal sigma stays near the spread level and -ELBO stays bounded without any floor.
D. "spread VAE" (seed 001's route, fastgen.spread.SpreadVAE): the same networks as a spread
   VAE, decoder N(y; g(z), s^2 I) with s the spread, fixed: a well-defined objective for the
   deterministic generator g. Its samples g(z), z ~ N(0, I) are judged by their RMS distance
   to the curve and the fraction of 64 equal arcs of the curve they reach (for every run).

"End" values in the JSON are medians over the last 5 % of the steps (the one-sample ELBO is
noisy); slopes are least-squares fits over the last quarter, per 1000 steps.

Writes <out>/vae_sigma_collapse.png (sigma and -ELBO per step) and vae_sigma_collapse.json.
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
from fastgen.spread import (SpreadVAE, gaussian_kl_standard, nll_lower_bound, optimal_log_sigma,  # noqa: E402
                            sigma_vae_nll)

NAME = "vae_sigma_collapse"
D, Z = 8, 2


def curve_data(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = 2 * math.pi * torch.rand(n, 1, generator=g)
    k = torch.arange(1, D // 2 + 1, dtype=torch.float32)
    return torch.cat([torch.cos(k * t), torch.sin(k * t)], 1)


class VAE(torch.nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.enc = torch.nn.Sequential(torch.nn.Linear(D, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.Tanh(), torch.nn.Linear(hidden, 2 * Z))
        self.dec = torch.nn.Sequential(torch.nn.Linear(Z, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, hidden),
                                       torch.nn.Tanh(), torch.nn.Linear(hidden, D))
        self.log_sigma = torch.nn.Parameter(torch.zeros(()))   # used by mode A only

    def forward(self, x, g):
        mu, logvar = self.enc(x).chunk(2, -1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g)
        return self.dec(z), mu, logvar


def train(mode: str, x: torch.Tensor, *, steps: int, lr: float, hidden: int, seed: int, min_log_sigma: float,
          spread: float):
    torch.manual_seed(seed)
    model = VAE(hidden)
    params = list(model.enc.parameters()) + list(model.dec.parameters())
    if mode == "learned":
        params.append(model.log_sigma)
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    log_sigma_t, nll_t, mse_t = [], [], []
    svae = SpreadVAE(model.dec, model.enc, spread, latent_dim=Z) if mode == "spread_vae" else None
    for _ in range(steps):
        if svae is not None:       # D: fixed decoder variance = the spread (seed 001's spread VAE)
            out = svae(x, generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            log_sigma_t.append(math.log(spread))
            nll_t.append(float(out.loss.detach()))
            mse_t.append(float((out.recon.detach() - out.y).square().mean()))
            continue
        y = fastgen.spread_noise(x, spread, generator=g) if mode == "spread" else x
        recon, mu, logvar = model(y, g)
        if mode == "learned":
            ls = model.log_sigma
        else:
            ls = optimal_log_sigma(recon, y, min_log_sigma=min_log_sigma)
        nll = sigma_vae_nll(recon, y, ls)            # nats per example, full constant
        loss = nll + gaussian_kl_standard(mu, logvar).mean()   # -ELBO
        opt.zero_grad()
        loss.backward()
        opt.step()
        log_sigma_t.append(float(ls.detach()))
        nll_t.append(float(loss.detach()))
        mse_t.append(float((recon.detach() - y).square().mean()))
    return np.asarray(log_sigma_t), np.asarray(nll_t), np.asarray(mse_t), model


@torch.no_grad()
def sample_quality(model: VAE, seed: int, n: int = 2000, bins: int = 64) -> dict:
    """Samples dec(z), z ~ N(0, I): RMS distance to the curve (nearest of 4096 curve points)
    and the fraction of ``bins`` equal arcs of the curve that hold a sample's nearest point."""
    t = torch.linspace(0, 2 * math.pi, 4097)[:-1, None]
    k = torch.arange(1, D // 2 + 1, dtype=torch.float32)
    curve = torch.cat([torch.cos(k * t), torch.sin(k * t)], 1)
    smp = model.dec(torch.randn(n, Z, generator=torch.Generator().manual_seed(seed + 99)))
    d2, idx = fastgen.knn(smp.contiguous(), curve, 1)
    return {"rms_distance_to_curve": float(d2.mean().sqrt()),
            "arc_coverage": float(torch.unique(idx[:, 0] * bins // 4096).numel() / bins)}


def tail_slope(v: np.ndarray, frac: float = 0.25) -> float:
    """Least-squares slope per 1000 steps over the last ``frac`` of the run."""
    n = max(int(len(v) * frac), 2)
    t = np.arange(n, dtype=np.float64)
    return float(np.polyfit(t, v[-n:], 1)[0] * 1000)


def main(argv=None) -> dict:
    p = _util.parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="data points on the curve")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--min-log-sigma", type=float, default=math.log(0.1), help="soft floor of run B (log sigma)")
    p.add_argument("--spread", type=float, default=0.1, help="spread std of run C")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    x = curve_data(a.n, a.seed)
    runs = {
        "learned": dict(min_log_sigma=-6.0, spread=0.0),
        "sigma_vae_floor": dict(min_log_sigma=a.min_log_sigma, spread=0.0),
        "spread": dict(min_log_sigma=-6.0, spread=a.spread),
        "spread_vae": dict(min_log_sigma=-6.0, spread=a.spread),
    }
    curves, res_runs = {}, {}
    for name, kw in runs.items():
        mode = {"learned": "learned", "sigma_vae_floor": "analytic", "spread": "spread", "spread_vae": "spread_vae"}[name]
        ls, nll, mse, model = train(mode, x, steps=a.steps, lr=a.lr, hidden=a.hidden, seed=a.seed, **kw)
        curves[name] = (ls, nll)
        k = max(len(ls) // 20, 1)      # "end" = median over the last 5 % of the steps (1-sample ELBO is noisy)
        res_runs[name] = {"sigma_start": float(np.exp(ls[0])), "sigma_end": float(np.exp(np.median(ls[-k:]))),
                          "log_sigma_end": float(np.median(ls[-k:])), "neg_elbo_start": float(nll[0]),
                          "neg_elbo_end": float(np.median(nll[-k:])), "neg_elbo_min": float(nll.min()),
                          "mse_end": float(mse[-1]),
                          "log_sigma_slope_per_1000_steps_last_quarter": tail_slope(ls),
                          "neg_elbo_slope_per_1000_steps_last_quarter": tail_slope(nll),
                          "samples": sample_quality(model, a.seed)}
    bound = nll_lower_bound(D, a.min_log_sigma)
    res = {
        "article": {"claim": "learned decoder variance -> 0 and the likelihood diverges (seed 002); the sigma-VAE "
                             "optimum sigma^2 = MSE with a soft floor on log sigma avoids it (Rybkin et al. 2021)"},
        "data": {"n": a.n, "D": D, "manifold_dim": 1, "latent_dim": Z},
        "steps": a.steps, "lr": a.lr, "hidden": a.hidden, "seed": a.seed,
        "min_log_sigma": a.min_log_sigma, "sigma_floor": math.exp(a.min_log_sigma),
        "neg_elbo_lower_bound_with_floor": bound, "spread_sigma": a.spread,
        "runs": res_runs, "threads": a.threads,
    }
    res["seconds"] = round(time.perf_counter() - t0, 2)

    plt = _util.plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = {"learned": "A: learned sigma (free parameter)",
              "sigma_vae_floor": f"B: sigma-VAE, sigma^2 = MSE, soft floor {math.exp(a.min_log_sigma):.3g}",
              "spread": f"C: sigma-VAE on spread data (s = {a.spread:g})",
              "spread_vae": f"D: spread VAE, decoder sigma = spread = {a.spread:g} (fixed)"}
    for (name, (ls, nll)), c in zip(curves.items(), ("C3", "C0", "C2", "C4")):
        axes[0].plot(np.exp(ls), c, lw=1.2, label=labels[name])
        axes[1].plot(nll, c, lw=1.2, label=labels[name])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("decoder sigma")
    axes[1].axhline(bound, color="C0", ls=":", lw=1, label="B's lower bound D (log floor + log(2 pi)/2)")
    axes[1].set_ylabel("-ELBO (nats per example)")
    axes[1].set_ylim(bound - 4, 15)          # D starts near 200 nats (fixed small sigma): clipped
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle("VAE on a 1-D curve in 8-D: a learned decoder variance collapses (seed 002)", fontsize=10)
    _util.save(fig, a.out, NAME, res, dpi=100)
    for name, r in res_runs.items():
        print(f"{name:16s} sigma {r['sigma_start']:.3g} -> {r['sigma_end']:.3g}  -ELBO {r['neg_elbo_start']:.2f} -> "
              f"{r['neg_elbo_end']:.2f}  slope(-ELBO, last quarter) {r['neg_elbo_slope_per_1000_steps_last_quarter']:.2f}"
              f" / 1000 steps; samples: RMS distance to curve {r['samples']['rms_distance_to_curve']:.3f}, "
              f"arc coverage {r['samples']['arc_coverage']:.2f}")
    print(f"B's bound: {bound:.3f} nats; wrote {a.out}/{NAME}.png, {NAME}.json ({res['seconds']} s)")
    return res


if __name__ == "__main__":
    main()
