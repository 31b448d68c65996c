"""A complete IMLE training loop (Li & Malik 2018) for vector data: MLP generator, latent pool
re-selected every few epochs (or a fresh pool per mini-batch) with :class:`IMLESampler`, Adam
with an optional cosine learning-rate decay. Used by ``fastgen demo`` and ``fastgen train``.

Methods (``IMLEConfig.method``): ``"imle"``; ``"rs-imle"`` (Vashist et al., ECCV 2024: the
same loop with ``rejection_radius`` > 0); ``"adaptive-imle"`` (Aghabozorgi, Peng, Li, ICLR 2023:
:class:`fastgen.imle.AdaptiveIMLESampler`, per-example thresholds and ages). ``proj_dim`` > 0
searches nearest neighbours in a fixed random projection (:class:`fastgen.imle.RandomProjection`).

Checkpoints: :func:`train_imle` can save everything the loop depends on (generator, Adam,
scheduler, sampler state and random generators, epoch, loss history) every few epochs and
resume from it; a resumed run is bit-identical to an uninterrupted one on the same machine and
thread count.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .adaptive import AdaptiveIMLESampler
from .features import RandomProjection
from .sampler import IMLESampler

IMLE_METHODS = ("imle", "rs-imle", "adaptive-imle")
CHECKPOINT_FORMAT = 1
# config fields that may differ between a checkpoint and the run resuming it (the cosine
# schedule is stretched when ``epochs`` grows; ``temperature`` only affects sampling)
RESUMABLE_CHANGES = ("epochs", "temperature")


@dataclass
class IMLEConfig:
    """Hyper-parameters of :func:`train_imle` (defaults: the tuned digits setting)."""
    method: str = "imle"            # "imle", "rs-imle" (needs rejection_radius > 0), "adaptive-imle"
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
    gamma: float = 0.02             # adaptive-imle: threshold tightening tau_i <- (1 - gamma) d_i
    max_age: int = 15               # adaptive-imle: forced re-selection after max_age epochs
    proj_dim: int = 0               # > 0: nearest neighbours in a seeded Gaussian random projection
    seed: int = 0

    def validate(self) -> None:
        """ValueError naming the field for an unknown method, prior or select_bf16, or an
        rs-imle config without a rejection radius."""
        if self.method not in IMLE_METHODS:
            raise ValueError(f"method must be one of {IMLE_METHODS}, got {self.method!r}")
        if self.method == "rs-imle" and not self.rejection_radius > 0:
            raise ValueError(f"rejection_radius must be > 0 for method 'rs-imle', got {self.rejection_radius!r}")
        if self.select_bf16 not in ("auto", "on", "off"):
            raise ValueError(f"select_bf16 must be 'auto', 'on' or 'off', got {self.select_bf16!r}")
        if isinstance(self.proj_dim, bool) or not isinstance(self.proj_dim, int) or self.proj_dim < 0:
            raise ValueError(f"proj_dim must be an int >= 0, got {self.proj_dim!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an int >= 1, got {self.epochs!r}")
        draw_prior(self.prior, 1, 1)   # validates the name

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
class RunRecord:
    """What an IMLE training loop returns and ``fastgen train`` reads (shared by
    :class:`TrainResult` and :class:`fastgen.imle.conditional.CIMLEResult`)."""
    generator: torch.nn.Module
    config: object
    loss: list = field(default_factory=list)        # mean training loss per epoch
    select_dist2: list = field(default_factory=list)  # (epoch, mean dist2) at each re-selection
    train_seconds: float = 0.0
    select_seconds: float = 0.0


@dataclass
class TrainResult(RunRecord):
    """:func:`train_imle`'s result: the MLPGenerator, its IMLEConfig, the sampler's state."""
    sampler: IMLESampler | AdaptiveIMLESampler | None = None
    reselected: list = field(default_factory=list)    # adaptive-imle: (epoch, latents replaced) per check
    start_epoch: int = 0                              # > 0 when resumed from a checkpoint

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

    def forward(self, *inputs):     # z, or (cond, z) for a conditional generator
        with torch.autocast(inputs[-1].device.type, dtype=torch.bfloat16):
            return self.gen(*inputs)


def adam_cosine(params, lr: float, lr_final: float, total_steps: int):
    """(Adam(params, lr), a LambdaLR stepped once per optimiser step: cosine decay from lr to
    lr_final over total_steps, then constant)."""
    opt = torch.optim.Adam(params, lr=lr)
    total = max(1, total_steps)
    ratio = lr_final / lr

    def lr_lambda(step):
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)


class _PriorSampler:
    """n -> [n, latent_dim] draws from the config's prior with its own seeded generator (its
    state is part of a checkpoint)."""

    def __init__(self, config: IMLEConfig, device):
        self.prior, self.latent_dim, self.device = config.prior, config.latent_dim, device
        self.rng = torch.Generator(device=device).manual_seed(config.seed + 1)

    def __call__(self, n):
        return draw_prior(self.prior, n, self.latent_dim, self.rng, self.device)


def make_sampler(gen: Callable, x: torch.Tensor, config: IMLEConfig):
    """The sampler of ``config.method`` for data x [N, D] and generator ``gen`` (the callable used
    for re-selection: the model, or the model under bf16 autocast)."""
    config.validate()
    prior = None if config.prior == "normal" else _PriorSampler(config, x.device)
    feature_fn = RandomProjection(config.proj_dim, x.shape[1], seed=config.seed) if config.proj_dim else None
    common = dict(latent_dim=config.latent_dim, pool_factor=config.pool_factor, staleness=config.staleness,
                  noise=config.noise, rejection_radius=config.rejection_radius, seed=config.seed,
                  latent_sampler=prior, feature_fn=feature_fn)
    if config.method == "adaptive-imle":
        return AdaptiveIMLESampler(gen, x, gamma=config.gamma, max_age=config.max_age, per_batch=config.per_batch,
                                   **common)
    return IMLESampler(gen, x, per_batch=config.per_batch, **common)


def _save_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """The checkpoint dict written by :func:`train_imle` (keys: format, epoch, config, generator,
    optimizer, scheduler, sampler, prior_rng, torch_rng, loss, select_dist2, reselected,
    train_seconds, select_seconds)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"checkpoint must be a path, got {type(path).__name__}")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a fastgen IMLE checkpoint (format {CHECKPOINT_FORMAT})")
    return ck


def train_imle(x: torch.Tensor, config: IMLEConfig, *, progress: bool = True, desc: str = "IMLE",
               checkpoint: str | None = None, checkpoint_every: int = 0, resume: bool = False,
               callback: Callable | None = None) -> TrainResult:
    """Train an MLP generator on x [N, D] (float32, already normalised) with IMLE.

    Every ``staleness`` epochs each example gets the latent of a fresh pool (pool_factor * N
    candidates, :func:`fastgen.imle.select_latents` on :func:`fastgen.knn`) whose sample is
    nearest; in between the selected latents are reused with Gaussian noise of std ``noise``.
    Each step minimises mean_i ||g(z_i) - x_i||^2 over a mini-batch (Li & Malik 2018, Alg. 1).
    ``config.method`` picks the variant (see the module docstring).

    Args:
        checkpoint: path of the checkpoint file (written atomically) or None.
        checkpoint_every: save every this many epochs (and after the last one); 0: never.
        resume: continue from ``checkpoint`` when the file exists (else start afresh). The
            checkpoint's config must equal ``config`` except for ``epochs`` and
            ``temperature``.
        callback: called as ``callback(epoch, result)`` after every epoch (and after that
            epoch's checkpoint); an exception it raises stops training (the checkpoint stays).

    Raises:
        ValueError: a bad config (see :meth:`IMLEConfig.validate`), ``checkpoint_every`` < 0,
            ``checkpoint_every`` or ``resume`` without ``checkpoint``, a checkpoint whose config
            differs, or a checkpoint that is not one of this loop.
    """
    from tqdm.auto import tqdm

    config.validate()
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
    if (checkpoint_every or resume) and checkpoint is None:
        raise ValueError("checkpoint (a file path) is required with checkpoint_every > 0 or resume=True")
    torch.manual_seed(config.seed)
    N, D = x.shape
    gen = MLPGenerator(config.latent_dim, D, tuple(config.hidden), config.out_act, skip=config.skip)
    use_bf16 = config.select_bf16 == "on" or (config.select_bf16 == "auto" and native_bf16(x.device))
    sampler = make_sampler(_Autocast(gen) if use_bf16 else gen, x, config)
    opt, sched = adam_cosine(gen.parameters(), config.lr, config.lr_final,
                             config.epochs * math.ceil(N / config.batch_size))
    res = TrainResult(gen, config, sampler=sampler)
    start = 0
    if resume and os.path.exists(checkpoint):
        ck = load_checkpoint(checkpoint)
        mine = config.to_dict()
        diff = sorted(k for k in set(mine) | set(ck["config"])
                      if k not in RESUMABLE_CHANGES and mine.get(k) != ck["config"].get(k))
        if diff:
            raise ValueError(f"checkpoint {checkpoint!r} was written with a different config: "
                             + ", ".join(f"{k}={ck['config'].get(k)!r} (now {mine.get(k)!r})" for k in diff))
        gen.load_state_dict(ck["generator"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        sampler.load_state_dict(ck["sampler"])
        if ck["prior_rng"] is not None:
            sampler.latent_sampler.rng.set_state(ck["prior_rng"])
        torch.set_rng_state(ck["torch_rng"])
        res.loss = list(ck["loss"])
        res.select_dist2 = [tuple(v) for v in ck["select_dist2"]]
        res.reselected = [tuple(v) for v in ck.get("reselected", [])]
        res.train_seconds = float(ck["train_seconds"])
        res.select_seconds = float(ck["select_seconds"])
        start = res.start_epoch = int(ck["epoch"])

    def save(epoch_done: int, seconds: float):
        prior = sampler.latent_sampler
        _save_atomic({"format": CHECKPOINT_FORMAT, "epoch": epoch_done, "config": config.to_dict(),
                      "generator": gen.state_dict(), "optimizer": opt.state_dict(),
                      "scheduler": sched.state_dict(), "sampler": sampler.state_dict(),
                      "prior_rng": prior.rng.get_state() if isinstance(prior, _PriorSampler) else None,
                      "torch_rng": torch.get_rng_state(), "loss": res.loss, "select_dist2": res.select_dist2,
                      "reselected": res.reselected, "train_seconds": seconds,
                      "select_seconds": res.select_seconds}, checkpoint)

    seconds0 = res.train_seconds
    t0 = time.perf_counter()
    bar = tqdm(range(start, config.epochs), desc=desc, disable=not progress, mininterval=0.5,
               initial=start, total=config.epochs)
    for ep in bar:
        before = sampler.selections
        ts = time.perf_counter()
        batches = sampler.epoch(config.batch_size)
        first = next(batches)                          # runs the re-selection / check when due
        if not config.per_batch:
            checked = isinstance(sampler, AdaptiveIMLESampler) and sampler.history and sampler.history[-1][0] == ep
            if sampler.selections != before or checked:
                res.select_seconds += time.perf_counter() - ts
            if sampler.selections != before:
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
        if isinstance(sampler, AdaptiveIMLESampler) and sampler.history and sampler.history[-1][0] == ep:
            res.reselected.append(tuple(sampler.history[-1]))
        if config.per_batch:
            res.select_dist2.append((ep, float(sampler.dist2.mean())))
        if progress:
            bar.set_postfix(loss=f"{res.loss[-1]:.4f}", refresh=False)
        res.train_seconds = seconds0 + time.perf_counter() - t0
        if checkpoint_every and ((ep + 1) % checkpoint_every == 0 or ep + 1 == config.epochs):
            tw = time.perf_counter()
            save(ep + 1, res.train_seconds)
            t0 += time.perf_counter() - tw          # train_seconds excludes checkpoint writes
        if callback is not None:
            callback(ep, res)
    res.train_seconds = seconds0 + time.perf_counter() - t0
    return res


def _chain(first, rest):
    yield first
    yield from rest
