"""A complete IMLE training loop (Li & Malik 2018) for vector data: MLP generator, latent pool
re-selected every few epochs (or a fresh pool per mini-batch) with :class:`IMLESampler`, Adam
with an optional cosine learning-rate decay. Used by ``fastgen demo`` and ``fastgen train``.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .sampler import IMLESampler


@dataclass
class IMLEConfig:
    """Hyper-parameters of :func:`train_imle` (defaults: the tuned digits setting)."""
    epochs: int = 200
    latent_dim: int = 32
    hidden: tuple = (1024, 1024, 1024)
    batch_size: int = 64
    lr: float = 1e-3
    lr_final: float = 1e-3          # cosine decay from lr to lr_final over the run
    pool_factor: float = 5.0        # candidates per example at each re-selection
    staleness: int = 5              # epochs between re-selections
    noise: float = 0.01             # latent perturbation between re-selections (std)
    per_batch: bool = False         # fresh pool of pool_factor x batch for every mini-batch
    out_act: str = "sigmoid"        # "sigmoid" (bounded data, normalised to [0, 1]) or "none"
    rejection_radius: float = 0.0   # RS-IMLE radius in normalised units (0: plain IMLE)
    temperature: float = 1.22       # scale of z when sampling after training
    train_bf16: bool = False        # training steps under bf16 autocast (fp32 weights and loss)
    skip: bool = False              # add a linear latent -> output path to the MLP
    prior: str = "normal"           # latent prior: "normal" N(0, I) or "uniform" U[-sqrt 3, sqrt 3]^L
                                    # (unit variance; equal-area cells for well-separated modes)
    select_bf16: str = "auto"       # generator forward of the re-selection pool under bf16
                                    # autocast: "auto" (when the CPU has native bf16), "on", "off"
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


class MLPGenerator(torch.nn.Module):
    """z [n, latent_dim] -> x [n, out_dim]: Linear-ReLU blocks, then a linear layer and an
    optional sigmoid (outputs in [0, 1])."""

    def __init__(self, latent_dim: int, out_dim: int, hidden=(512, 512), out_act: str = "sigmoid",
                 skip: bool = False):
        super().__init__()
        if out_act not in ("sigmoid", "none"):
            raise ValueError(f"out_act must be 'sigmoid' or 'none', got {out_act!r}")
        layers, d = [], latent_dim
        for h in hidden:
            layers += [torch.nn.Linear(d, h), torch.nn.ReLU()]
            d = h
        layers.append(torch.nn.Linear(d, out_dim))
        self.net = torch.nn.Sequential(*layers)
        self.skip = None
        if skip:   # linear latent -> output path, initialised to the identity on the shared dims:
            # with unit-variance latents and standardised data the generator starts as a spread
            # of the data's scale (no folds), and the MLP learns the clustering on top of it
            self.skip = torch.nn.Linear(latent_dim, out_dim, bias=False)
            with torch.no_grad():
                self.skip.weight.zero_()
                self.skip.weight[:min(latent_dim, out_dim), :min(latent_dim, out_dim)].fill_diagonal_(1.0)
        self.out_act = out_act
        self.latent_dim = latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.net(z)
        if self.skip is not None:
            h = h + self.skip(z)
        return torch.sigmoid(h) if self.out_act == "sigmoid" else h


@dataclass
class TrainResult:
    generator: MLPGenerator
    config: IMLEConfig
    loss: list = field(default_factory=list)        # mean training loss per epoch
    select_dist2: list = field(default_factory=list)  # (epoch, mean dist2) at each re-selection
    train_seconds: float = 0.0
    select_seconds: float = 0.0
    sampler: IMLESampler | None = None

    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 1234) -> torch.Tensor:
        """n samples [n, out_dim] in the normalised units the generator was trained in."""
        g = torch.Generator().manual_seed(seed)
        z = draw_prior(self.config.prior, n, self.config.latent_dim, g) * self.config.temperature
        self.generator.eval()
        out = torch.cat([self.generator(z[s:s + 4096]) for s in range(0, n, 4096)])
        self.generator.train()
        return out


def draw_prior(prior: str, n: int, latent_dim: int, generator: torch.Generator | None = None,
               device="cpu") -> torch.Tensor:
    """n latents [n, latent_dim] from the prior: "normal" N(0, I) or "uniform" on
    [-sqrt 3, sqrt 3]^latent_dim (zero mean, unit variance)."""
    if prior == "normal":
        return torch.randn(n, latent_dim, generator=generator, device=device)
    if prior == "uniform":
        return (torch.rand(n, latent_dim, generator=generator, device=device) * 2 - 1) * math.sqrt(3.0)
    raise ValueError(f"prior must be 'normal' or 'uniform', got {prior!r}")


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """True when bf16 matmuls are fast here: a CUDA device, or a CPU with native bf16
    instructions (AVX512-BF16 / AMX) used by oneDNN."""
    if torch.device(device).type == "cuda":
        return True
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


class _Autocast(torch.nn.Module):
    """The generator under bf16 autocast (re-selection only: the pick of the nearest sample
    tolerates bf16 rounding; training steps stay in float32)."""

    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def forward(self, z):
        with torch.autocast(z.device.type, dtype=torch.bfloat16):
            return self.gen(z)


def _prior_sampler(config: IMLEConfig, device):
    g = torch.Generator(device=device).manual_seed(config.seed + 1)
    return lambda n: draw_prior(config.prior, n, config.latent_dim, g, device)


def train_imle(x: torch.Tensor, config: IMLEConfig, *, progress: bool = True, desc: str = "IMLE") -> TrainResult:
    """Train an MLP generator on x [N, D] (float32, already normalised) with IMLE.

    Every ``staleness`` epochs each example gets the latent of a fresh pool (pool_factor * N
    candidates, :func:`fastgen.imle.select_latents` on :func:`fastgen.knn`) whose sample is
    nearest; in between the selected latents are reused with Gaussian noise of std ``noise``.
    Each step minimises mean_i ||g(z_i) - x_i||^2 over a mini-batch (Li & Malik 2018, Alg. 1).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    N, D = x.shape
    gen = MLPGenerator(config.latent_dim, D, tuple(config.hidden), config.out_act, skip=config.skip)
    if config.select_bf16 not in ("auto", "on", "off"):
        raise ValueError(f"select_bf16 must be 'auto', 'on' or 'off', got {config.select_bf16!r}")
    draw_prior(config.prior, 1, 1)   # validates the name
    use_bf16 = config.select_bf16 == "on" or (config.select_bf16 == "auto" and native_bf16(x.device))
    sampler = IMLESampler(_Autocast(gen) if use_bf16 else gen, x, latent_dim=config.latent_dim, pool_factor=config.pool_factor,
                          staleness=config.staleness, noise=config.noise, per_batch=config.per_batch,
                          rejection_radius=config.rejection_radius, seed=config.seed,
                          latent_sampler=None if config.prior == "normal" else _prior_sampler(config, x.device))
    opt = torch.optim.Adam(gen.parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(N / config.batch_size)
    total = max(1, config.epochs * steps_per_epoch)
    ratio = config.lr_final / config.lr

    def lr_lambda(step):
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    res = TrainResult(gen, config, sampler=sampler)
    t0 = time.perf_counter()
    bar = tqdm(range(config.epochs), desc=desc, disable=not progress, mininterval=0.5)
    for ep in bar:
        reselect = sampler.latents is None or sampler.epochs_seen % sampler.staleness == 0
        ts = time.perf_counter()
        batches = sampler.epoch(config.batch_size)
        first = next(batches)                          # runs the re-selection when due
        if reselect and not config.per_batch:
            res.select_seconds += time.perf_counter() - ts
            res.select_dist2.append((ep, float(sampler.dist2.mean())))
        tot, cnt = 0.0, 0
        for z, idx in _chain(first, batches):
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=config.train_bf16):
                out = gen(z)
            loss = ((out.float() - x[idx]) ** 2).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(idx)
            cnt += len(idx)
        res.loss.append(tot / cnt)
        if config.per_batch:
            res.select_dist2.append((ep, float(sampler.dist2.mean())))
        if progress:
            bar.set_postfix(loss=f"{res.loss[-1]:.4f}", refresh=False)
    res.train_seconds = time.perf_counter() - t0
    return res


def _chain(first, rest):
    yield first
    yield from rest
