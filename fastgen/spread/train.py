"""Training loops for a deterministic MLP generator by spread divergence (the fused Monte-Carlo
objective of :class:`fastgen.nn.SpreadDivergenceLoss`) or as a spread VAE
(:class:`fastgen.spread.SpreadVAE`), for vector data already normalised (the command line's
digits in [0, 1], the 25-mode grid in its own units).

Both anneal the spread geometrically from ``sigma_start`` to ``sigma_end`` over the run (a large
spread gives global gradients, a small one sharp samples; seed 001), Adam with a cosine decay
from ``lr`` to ``lr_final``. The result has the interface of
:class:`fastgen.imle.train.TrainResult` used by the command line (``loss`` per epoch,
``sample(n, seed=...)``, ``train_seconds``).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .._validate import check_kind
from ..imle.train import MLPGenerator, draw_prior
from ..nn.spread import SpreadDivergenceLoss
from .vae import SpreadVAE

__all__ = ["SpreadConfig", "SpreadTrainResult", "default_config", "train_spread", "train_spread_vae"]


@dataclass
class SpreadConfig:
    """Hyper-parameters of :func:`train_spread` / :func:`train_spread_vae`; the tuned settings
    per dataset come from :func:`default_config`."""
    epochs: int = 300
    latent_dim: int = 8
    hidden: tuple = (128, 128, 128)
    batch_size: int = 512           # data examples per step
    n_samples: int = 2048           # generator samples per step (spread divergence)
    lr: float = 3e-3
    lr_final: float = 1e-4
    sigma_start: float = 1.0        # spread at the first step (data units)
    sigma_end: float = 0.05         # spread at the last step
    kind: str = "laplace"           # spread noise of train_spread (train_spread_vae is Gaussian)
    out_act: str = "none"           # "sigmoid" for data in [0, 1]
    prior: str = "normal"           # latent prior: "normal" N(0, I) or "uniform" on [-sqrt 3, sqrt 3]^latent_dim
    skip: bool = False              # linear latent -> output path initialised to the identity (MLPGenerator)
    anneal: float = 1.0             # fraction of the steps over which sigma is annealed (then held at sigma_end)
    num_draws: int = 1              # spread-noise draws per data example (SpreadDivergenceLoss)
    antithetic: bool = False        # also the mirrored draw data - noise (SpreadDivergenceLoss)
    temperature: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def default_config(method: str, data: str, epochs: int | None = None, seed: int = 0) -> SpreadConfig:
    """Settings for ``method`` in ("spread", "spread-vae") on ``data`` in ("grid-gmm", "digits").

    grid-gmm (data standardised by its std, as the command line does), spread: the setting that
    lets IMLE cover the grid (fastgen.cli.default_config): a 2-D uniform latent and a linear
    skip path initialised to the identity (the generator starts as a square of the data's scale,
    without folds), Laplace spread annealed 0.3 -> 0.01 data stds, and S = 256 generator
    samples per step for 512 data points. With S < batch each sample is pulled by the spread
    data it explains, including the samples stranded between modes; with S >> batch (2048) or
    an 8-D Gaussian latent, stranded samples get almost no gradient and modes are lost (an 8-D
    N(0, I) latent, 128x3 MLP, S = 2048, Laplace 1.0 -> 0.05: 12-21/25). Measured on a busy
    2-core CPU, one torch thread, 300 epochs = 3000 steps, 25-45 s: 25/25 modes on seeds 0-5
    (high-quality fraction 0.54-0.68); 6 s on a quiet core. The annealing matters, and its start
    more than its length: modes covered on seeds 0-2 for sigma_start 0.01 (no annealing) / 0.1 /
    0.2 / 0.3 / 0.5 / 1.0: 2-4 / 19-25 / 25 / 25 / 15-16 / 6-10 (a start near 0.4 x the mode
    spacing of 0.71 data stds); sigma_end 0.02: 23-25; Gaussian spread: 10-25; antithetic: 25
    (high-quality fraction 0.63-0.69, within the seed spread). spread-vae, 8000 steps, Gaussian spread 0.3 -> 0.01 data
    stds, N(0, I_2) latent, 128x3 MLPs: 25/25 modes on seeds 0-2 (0.57-0.59), 20-35 s (a final
    spread of 0.05 data stds: 8/25, the samples stay blurred between modes).

    digits (pixels / 16 in [0, 1]), seed 0, one thread: spread, 200 epochs, Laplace 0.5 -> 0.03,
    256x256 MLP, S = 4096 generator samples per step of 128 digits: precision 0.93, recall 0.35,
    10/10 classes (seed 1: 0.94 / 0.38; 95-185 s; at sampling temperature 1.2: 0.90 / 0.46;
    60 epochs with a 512x512 MLP: 0.93 / 0.28 in 130 s). Here S is the lever, opposite to the grid:
    the Monte-Carlo log-density log 1/S sum_s K(y - g(z_s)) is biased low, the more so the fewer
    samples land near y in 64-D, and that bias rewards clumped samples: S = 64 / 128 / 1024 /
    4096: recall 0.003 / 0.03 / 0.17 / 0.28 (a 256x256 MLP with S = 8192 / 16384: 0.26 / 0.29).
    A larger final spread (0.1) or Gaussian spread lowers recall (0.10 / 0.11 at S = 1024).
    spread-vae, Gaussian 0.5 -> 0.03, 512x512 MLPs, latent 32: the slower the annealing, the
    better: 60 / 300 / 500 epochs: precision 0.88 / 0.88 / 0.88, recall 0.05 / 0.42 / 0.50
    (seed 1: 0.88 / 0.47; 500 epochs: 50-95 s; at temperature 1.2: 0.82 / 0.69). A larger final spread lowers recall
    (0.15: 0.01 at 60 epochs); latent 8 helps short runs (60 epochs: 0.90 / 0.18). IMLE's tuned
    demo: 0.91 / 0.63.
    """
    if method not in ("spread", "spread-vae"):
        raise ValueError(f"method must be 'spread' or 'spread-vae', got {method!r}")
    if data == "grid-gmm":
        if method == "spread":
            cfg = SpreadConfig(epochs=300, latent_dim=2, hidden=(256, 256), batch_size=512, n_samples=256, lr=1e-3,
                               lr_final=1e-3, sigma_start=0.3, sigma_end=0.01, kind="laplace", prior="uniform",
                               skip=True)
        else:
            cfg = SpreadConfig(epochs=400, latent_dim=2, batch_size=256, sigma_start=0.3, sigma_end=0.01,
                               kind="gaussian")
    elif data == "digits":
        if method == "spread":
            cfg = SpreadConfig(epochs=200, latent_dim=32, hidden=(256, 256), batch_size=128, n_samples=4096,
                               lr=1e-3, lr_final=1e-4, sigma_start=0.5, sigma_end=0.03, out_act="sigmoid",
                               kind="laplace")
        else:
            cfg = SpreadConfig(epochs=500, latent_dim=32, hidden=(512, 512), batch_size=128, n_samples=1024,
                               lr=1e-3, lr_final=1e-4, sigma_start=0.5, sigma_end=0.03, out_act="sigmoid",
                               kind="gaussian")
    else:
        raise ValueError(f"data must be 'digits' or 'grid-gmm', got {data!r}")
    if epochs is not None:
        cfg.epochs = epochs
    cfg.seed = seed
    return cfg


@dataclass
class SpreadTrainResult:
    generator: torch.nn.Module
    config: SpreadConfig
    loss: list = field(default_factory=list)          # mean training loss per epoch (nats per example)
    sigma: list = field(default_factory=list)         # spread at the end of each epoch
    select_dist2: list = field(default_factory=list)  # always empty (no re-selection; CLI plot compatibility)
    log: list = field(default_factory=list)           # {"step", "sigma", "loss"} every 100 steps and the last step
    train_seconds: float = 0.0
    select_seconds: float = 0.0

    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 1234) -> torch.Tensor:
        """n noiseless samples g(z) [n, D], z ~ N(0, temperature^2 I), in training units."""
        g = torch.Generator().manual_seed(seed)
        z = draw_prior(self.config.prior, n, self.config.latent_dim, g) * self.config.temperature
        return torch.cat([self.generator(z[s:s + 4096]) for s in range(0, n, 4096)])


def _check(x, config):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a float tensor [N, D], got {type(x).__name__} "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else ''}")
    if not isinstance(config, SpreadConfig):
        raise TypeError(f"config must be a SpreadConfig, got {type(config).__name__}")
    if not (config.sigma_start > 0 and config.sigma_end > 0):
        raise ValueError("sigma_start and sigma_end must be > 0")
    if config.epochs < 1 or config.batch_size < 1 or config.n_samples < 1:
        raise ValueError("epochs, batch_size and n_samples must be >= 1")
    if config.prior not in ("normal", "uniform"):
        raise ValueError(f"prior must be 'normal' or 'uniform', got {config.prior!r}")
    if not 0 < config.anneal <= 1:
        raise ValueError(f"anneal must be in (0, 1], got {config.anneal!r}")


def _schedule(config, N):
    steps_per_epoch = max(1, math.ceil(N / config.batch_size))
    total = config.epochs * steps_per_epoch

    def sigma_at(step):
        frac = min(step / max(config.anneal * (total - 1), 1), 1.0)
        return config.sigma_start * (config.sigma_end / config.sigma_start) ** frac

    def lr_lambda(step):
        r = config.lr_final / config.lr
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    return steps_per_epoch, sigma_at, lr_lambda


def _loop(x, config, step_fn, params, progress, desc):
    from tqdm.auto import tqdm

    N = x.shape[0]
    steps_per_epoch, sigma_at, lr_lambda = _schedule(config, N)
    opt = torch.optim.Adam(params, lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    g = torch.Generator().manual_seed(config.seed + 1)
    losses, sigmas, log = [], [], []
    total = config.epochs * steps_per_epoch
    step = 0
    t0 = time.perf_counter()
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, mininterval=0.5)
    for _ in bar:
        tot = 0.0
        for _ in range(steps_per_epoch):
            sigma = sigma_at(step)
            idx = torch.randint(0, N, (min(config.batch_size, N),), generator=g)
            loss = step_fn(x[idx], sigma, g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            lv = float(loss.detach())
            tot += lv
            if step % 100 == 0 or step == total - 1:
                log.append({"step": step, "sigma": sigma, "loss": lv})
            step += 1
        losses.append(tot / steps_per_epoch)
        sigmas.append(sigma)
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", sigma=f"{sigma:.3g}", refresh=False)
    return losses, sigmas, log, time.perf_counter() - t0


def train_spread(x: torch.Tensor, config: SpreadConfig, *, progress: bool = True,
                 desc: str = "spread") -> SpreadTrainResult:
    """Train an MLP generator on x [N, D] by minimising the spread divergence
    -mean log (q*K)(x + noise) (Monte-Carlo density from ``n_samples`` fresh samples per step)."""
    _check(x, config)
    kind = check_kind(config.kind)
    torch.manual_seed(config.seed)
    gen = MLPGenerator(config.latent_dim, x.shape[1], tuple(config.hidden), config.out_act, skip=config.skip)

    def step_fn(xb, sigma, g):
        z = draw_prior(config.prior, config.n_samples, config.latent_dim, g)
        loss_fn = SpreadDivergenceLoss(sigma, kind=kind, num_draws=config.num_draws, antithetic=config.antithetic)
        return loss_fn(gen(z), xb, generator=g)

    losses, sigmas, log, secs = _loop(x, config, step_fn, list(gen.parameters()), progress, desc)
    return SpreadTrainResult(gen, config, losses, sigmas, [], log, secs, 0.0)


def train_spread_vae(x: torch.Tensor, config: SpreadConfig, *, progress: bool = True,
                     desc: str = "spread-vae") -> SpreadTrainResult:
    """Train an MLP generator on x [N, D] as a spread VAE (Gaussian spread; MLP encoder with the
    generator's hidden sizes), loss = -ELBO in nats per example. ``kind`` and ``n_samples`` are
    not used; the prior must be "normal" (the VAE's N(0, I))."""
    _check(x, config)
    if config.prior != "normal":
        raise ValueError("prior must be 'normal' for a spread VAE (its KL term is against N(0, I)), "
                         f"got {config.prior!r}")
    torch.manual_seed(config.seed)
    D = x.shape[1]
    gen = MLPGenerator(config.latent_dim, D, tuple(config.hidden), config.out_act, skip=config.skip)
    layers, d = [], D
    for h in config.hidden:
        layers += [torch.nn.Linear(d, h), torch.nn.ReLU()]
        d = h
    layers.append(torch.nn.Linear(d, 2 * config.latent_dim))
    vae = SpreadVAE(gen, torch.nn.Sequential(*layers), config.sigma_start, latent_dim=config.latent_dim)

    def step_fn(xb, sigma, g):
        vae.sigma.fill_(sigma)
        return vae(xb, generator=g).loss

    losses, sigmas, log, secs = _loop(x, config, step_fn, list(vae.parameters()), progress, desc)
    return SpreadTrainResult(gen, config, losses, sigmas, [], log, secs, 0.0)
