"""Spread divergence makes maximum likelihood work for models with zero likelihood (seed 001).

Seed 001 (Barber, "Training models that have zero likelihood"; Zhang, Hayes, Bird, Habib &
Barber, "Spread Divergence", ICML 2020, arXiv 1811.08968). Three experiments:

1. Two deltas p = delta(mu_p), q = delta(mu_q): KL(p || q) is undefined, but after spreading both
   with the same noise it is finite. The fused Monte-Carlo estimate (fastgen.spread_noise +
   fastgen.spread_log_likelihood: mean over y ~ p*K of log p*K(y) - log q*K(y)) is compared with
   the closed forms (mu_p - mu_q)^2 / (2 sigma^2) (Gaussian spread, std sigma) and
   |d|/b + exp(-|d|/b) - 1 (Laplace spread, scale b), with its standard error (z-scores).
2. A delta model q_theta = delta(theta) fitted to a data delta at mu_p (2-D) by minimising
   fastgen.nn.SpreadDivergenceLoss: maximum likelihood has no gradient here (the likelihood is
   0 for every theta != mu_p), the spread objective converges to theta = mu_p.
3. A deterministic generator x = g(z) on the 25-mode grid (fastgen.data grid-gmm, std 0.05)
   trained with SpreadDivergenceLoss: exactly ``fastgen train --method spread --data grid-gmm``
   (fastgen.spread.train.default_config / train_spread, the data standardised by its std): a
   2-D uniform latent with a linear identity skip path, Laplace spread annealed geometrically
   0.3 -> 0.01 data stds over 3000 steps, 256 generator samples per 512 data points. Judged by
   fastgen.metrics.grid_modes (a mode is covered when >= 1 % of the samples lie within 3 std
   of it): 25/25 on seeds 0-5. The flags override single settings (spreads in data stds).

Writes <out>/spread_deltas.png and <out>/spread_deltas.json. Runs with one torch thread by
default (small models: OpenMP threads only contend on a shared CPU).
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
from fastgen import data as datasets  # noqa: E402
from fastgen import metrics  # noqa: E402

NAME = "spread_deltas"


# ------------------------------------------------------------------------------ 1. two deltas
def mc_kl_two_deltas(mu_p: float, mu_q: float, sigma: float, kind: str, n: int, generator: torch.Generator):
    """(estimate, standard error) of KL(delta(mu_p)*K || delta(mu_q)*K) from n spread draws."""
    y = fastgen.spread_noise(torch.full((n, 1), mu_p, dtype=torch.float64), sigma, kind=kind, generator=generator)
    lp = fastgen.spread_log_likelihood(y, torch.tensor([[mu_p]], dtype=torch.float64), sigma, kind=kind)
    lq = fastgen.spread_log_likelihood(y, torch.tensor([[mu_q]], dtype=torch.float64), sigma, kind=kind)
    r = lp - lq
    return float(r.mean()), float(r.std() / math.sqrt(n))


def two_deltas(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for kind in ("gaussian", "laplace"):
        for sigma in (0.5, 1.0, 2.0):
            for d in (0.25, 1.0, 3.0):
                est, se = mc_kl_two_deltas(0.0, d, sigma, kind, n, g)
                exact = fastgen.spread.kl_two_deltas(0.0, d, sigma, kind=kind)
                rows.append({"kind": kind, "sigma": sigma, "d": d, "closed_form": exact, "monte_carlo": est,
                             "std_error": se, "z": (est - exact) / se if se > 0 else 0.0,
                             "rel_err": abs(est - exact) / exact})
    return rows


# ------------------------------------------------------------------------------ 2. delta model
def fit_delta(mu_p, sigma: float, kind: str, steps: int, n_noise: int, seed: int):
    """theta (a 2-D delta) fitted to the data delta mu_p by SpreadDivergenceLoss."""
    g = torch.Generator().manual_seed(seed)
    target = torch.tensor(mu_p, dtype=torch.float32).reshape(1, -1)
    data = target.expand(n_noise, -1)
    theta = torch.zeros_like(target, requires_grad=True)
    loss_fn = fastgen.nn.SpreadDivergenceLoss(sigma, kind=kind, antithetic=True)
    opt = torch.optim.Adam([theta], lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0.002)
    path, kl = [], []
    for _ in range(steps):
        loss = loss_fn(theta, data, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        t = theta.detach()[0]
        path.append([float(v) for v in t])
        kl.append(float(fastgen.spread.kl_two_deltas(target[0], t, sigma, kind=kind).sum()))
    return np.asarray(path), np.asarray(kl)


# ------------------------------------------------------------------------------ 3. grid
def train_grid(*, seed: int, **overrides):
    """``fastgen train --method spread --data grid-gmm --seed <seed>``: the command line's
    default_config (fastgen.spread.train) with ``overrides`` (None values ignored), the data
    standardised by its std, 2500 samples drawn with seed + 1234."""
    from fastgen.spread.train import default_config, train_spread

    cfg = default_config("spread", "grid-gmm", seed=seed)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    split = datasets.load("grid-gmm", seed=seed)
    scale = float(split.x_train.std())
    x = torch.from_numpy(split.x_train) / scale
    r = train_spread(x, cfg, progress=False)
    smp = (r.sample(2500, seed=seed + 1234) * scale).numpy()
    m = metrics.grid_modes(smp, datasets.grid_centres(), datasets.GRID_STD)
    return smp, split.x_train, m, r, cfg, scale


def main(argv=None) -> dict:
    p = _util.parser(NAME, __doc__.splitlines()[0])
    p.add_argument("--mc-draws", type=int, default=200_000, help="Monte-Carlo draws per two-delta KL")
    p.add_argument("--delta-steps", type=int, default=300, help="Adam steps of the delta-model fit")
    g = p.add_argument_group("25-mode grid (default: fastgen.spread.train.default_config('spread', 'grid-gmm'), "
                             "the settings of `fastgen train --method spread --data grid-gmm`; spreads in units of "
                             "the data's std)")
    g.add_argument("--grid-steps", type=int, default=None,
                   help="training steps, rounded up to whole epochs (default: the config's epochs; 0: skip)")
    g.add_argument("--grid-kind", default=None, choices=("gaussian", "laplace"))
    g.add_argument("--grid-samples", type=int, default=None, help="generator samples per step")
    g.add_argument("--grid-batch", type=int, default=None, help="data examples per step")
    g.add_argument("--sigma-start", type=float, default=None)
    g.add_argument("--sigma-end", type=float, default=None)
    g.add_argument("--anneal", type=float, default=None, help="fraction of the steps spent annealing sigma")
    g.add_argument("--hidden", type=int, default=None, help="width of each hidden layer (the config's depth)")
    g.add_argument("--lr", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()

    rows = two_deltas(a.mc_draws, a.seed)
    mu_p = (3.0, -2.0)
    fits = {}
    for kind in ("gaussian", "laplace"):
        path, kl = fit_delta(mu_p, 1.0, kind, a.delta_steps, 256, a.seed)
        fits[kind] = (path, kl)
    res: dict = {
        "article": {"gaussian": "(mu_p - mu_q)^2 / (2 sigma^2)", "laplace": "|d|/b + exp(-|d|/b) - 1",
                    "source": "seed 001 (Barber; Zhang et al. 2020 'Spread Divergence')"},
        "seed": a.seed,
        "two_deltas": {"mc_draws": a.mc_draws, "cases": rows,
                       "max_abs_z": max(abs(r["z"]) for r in rows),
                       "max_rel_err": max(r["rel_err"] for r in rows)},
        "delta_model": {kind: {"data_delta": list(mu_p), "init": [0.0, 0.0], "sigma": 1.0, "steps": a.delta_steps,
                               "theta": [float(v) for v in path[-1]],
                               "distance": float(np.linalg.norm(path[-1] - np.asarray(mu_p))),
                               "spread_kl_start": float(kl[0]), "spread_kl_end": float(kl[-1])}
                        for kind, (path, kl) in fits.items()},
    }
    smp = data = None
    if a.grid_steps is None or a.grid_steps > 0:
        from fastgen.spread.train import default_config

        cfg0 = default_config("spread", "grid-gmm")
        epochs = None
        if a.grid_steps is not None:
            steps_per_epoch = math.ceil(5000 / (a.grid_batch or cfg0.batch_size))   # grid-gmm: 5000 training points
            epochs = max(1, math.ceil(a.grid_steps / steps_per_epoch))
        smp, data, m, r, cfg, scale = train_grid(
            seed=a.seed, epochs=epochs, kind=a.grid_kind, n_samples=a.grid_samples, batch_size=a.grid_batch,
            sigma_start=a.sigma_start, sigma_end=a.sigma_end, anneal=a.anneal, lr=a.lr,
            hidden=None if a.hidden is None else (a.hidden,) * len(cfg0.hidden))
        res["grid"] = {"config": cfg.to_dict(), "data_scale": scale, "kind": cfg.kind,
                       "steps": r.log[-1]["step"] + 1, "sigma_start": cfg.sigma_start, "sigma_end": cfg.sigma_end,
                       "sigma_start_data_units": cfg.sigma_start * scale, "sigma_end_data_units": cfg.sigma_end * scale,
                       "command": f"fastgen train --method spread --data grid-gmm --seed {a.seed}",
                       "modes_covered": m["modes_covered"], "n_modes": m["n_modes"],
                       "high_quality_fraction": m["high_quality_fraction"], "per_mode_fraction": m["per_mode"],
                       "train_seconds": round(r.train_seconds, 2), "log": r.log}
    res["threads"] = a.threads
    res["seconds"] = round(time.perf_counter() - t0, 2)

    plt = _util.plt()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    for kind, c in (("gaussian", "C0"), ("laplace", "C3")):
        dd = np.linspace(0.0, 3.2, 200)
        for sigma, ls in ((0.5, "-"), (1.0, "--"), (2.0, ":")):
            ax.plot(dd, [fastgen.spread.kl_two_deltas(0.0, float(v), sigma, kind=kind) for v in dd], c, ls=ls, lw=1,
                    label=f"{kind}, sigma={sigma:g}")
            pts = [r for r in rows if r["kind"] == kind and r["sigma"] == sigma]
            ax.errorbar([r["d"] for r in pts], [r["monte_carlo"] for r in pts], yerr=[3 * r["std_error"] for r in pts],
                        fmt="o", ms=3, color=c)
    ax.set_yscale("log")
    ax.set_xlabel("d = mu_q - mu_p")
    ax.set_ylabel("KL(p*K || q*K) (nats)")
    ax.set_title("two deltas: closed form (lines) vs fused MC (dots, 3 s.e.)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[1]
    for kind, c in (("gaussian", "C0"), ("laplace", "C3")):
        path, kl = fits[kind]
        ax.plot(np.linalg.norm(path - np.asarray(mu_p), axis=1), c, label=f"|theta - mu_p| ({kind})")
        ax.plot(kl, c, ls="--", lw=1, label=f"spread KL ({kind})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"delta model fitted to delta at {mu_p} (ML: no gradient)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[2]
    if smp is not None:
        g = res["grid"]
        ax.scatter(data[:, 0], data[:, 1], s=2, c="0.7", label="data")
        ax.scatter(smp[:, 0], smp[:, 1], s=2, c="C3", alpha=0.5, label=f"g(z), z ~ {g['config']['prior']} prior")
        c = datasets.grid_centres()
        ax.scatter(c[:, 0], c[:, 1], s=12, marker="x", c="k")
        ax.set_aspect("equal")
        ax.set_xlim(-5.5, 5.5)
        ax.set_ylim(-5.5, 5.5)
        ax.set_title(f"deterministic generator, {g['kind']} spread {g['sigma_start_data_units']:.2g}->"
                     f"{g['sigma_end_data_units']:.2g}:\n"
                     f"{g['modes_covered']}/25 modes, hq {g['high_quality_fraction']:.2f}", fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    else:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(a.out, exist_ok=True)
    fig.savefig(os.path.join(a.out, f"{NAME}.png"), dpi=100)
    plt.close(fig)
    _util.write_json(a.out, NAME, res)
    td = res["two_deltas"]
    print(f"two deltas: {len(rows)} cases, max |z| = {td['max_abs_z']:.2f}, max rel. err = {td['max_rel_err']:.4f}")
    for kind, f in res["delta_model"].items():
        print(f"delta model ({kind}): theta = ({f['theta'][0]:.4f}, {f['theta'][1]:.4f}) vs data {mu_p}, "
              f"distance {f['distance']:.2e}")
    if "grid" in res:
        g = res["grid"]
        print(f"grid: {g['modes_covered']}/25 modes, high-quality fraction {g['high_quality_fraction']:.3f} "
              f"({g['train_seconds']:.1f} s training)")
    print(f"wrote {a.out}/{NAME}.png, {NAME}.json ({res['seconds']} s)")
    return res


if __name__ == "__main__":
    main()
