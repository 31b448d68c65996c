"""Learned spread: a per-dimension noise scale trained to *maximise* the spread divergence while
the generator minimises it (Zhang, Hayes, Bird, Habib & Barber, "Spread Divergence", ICML 2020,
arXiv 1811.08968: "maximising the discriminatory power" of the spread).

The game
--------
    min_theta  max_sigma  KL( p * K_sigma || q_theta * K_sigma ),   K_sigma = N(0, diag sigma^2)
                                                                    (or Laplace with scales sigma)

A spread that discriminates better gives the generator stronger, better-aimed gradients: the
divergence is most sensitive in the dimensions where little noise hides the mismatch.

Why a constraint is needed (documented design choice)
-----------------------------------------------------
Adding more noise is a Markov kernel applied to both distributions, so by the data-processing
inequality the spread KL can only *decrease* when any sigma_j grows (Gaussian: K_big = K_small *
N(0, big^2 - small^2); Laplace: Laplace(b2) = Laplace(b1) * [point mass with weight b1^2 / b2^2,
else Laplace(b2)], from the characteristic functions 1 / (1 + b^2 w^2)). The unconstrained maximum
over sigma is therefore sigma -> 0 in every dimension, which is the undefined divergence the
spread was meant to avoid. Two safeguards:

* a floor: ``sigma_j = min_sigma + excess_j`` with ``excess_j > 0``, so sigma can never go
  below ``min_sigma`` (a hard floor reached only asymptotically; gradients stay smooth);
* ``constraint="volume"`` (default): the geometric mean of the excesses is held fixed at its
  initial value (``log excess_j = log c + a_j - mean(a)``), i.e. the noise volume
  sum_j log(sigma_j - min_sigma) is constant. The game then *redistributes* noise: less in the
  dimensions where model and data differ, more where they agree. ``constraint="none"``
  leaves only the floor (sigma then drifts to the floor; use it with a small learning rate or a
  schedule).

Usage (one step of the game; the spread ascends the divergence, the generator descends the
cross-entropy)::

    spread = LearnedSpread(dim=D, sigma=0.5, min_sigma=0.05)
    opt_g = torch.optim.Adam(gen.parameters(), 1e-3)
    opt_s = torch.optim.Adam(spread.parameters(), 1e-2)
    g_loss, s_loss = spread.game_losses(gen(z), x)
    opt_g.zero_grad(); opt_s.zero_grad()
    (g_loss + s_loss).backward()      # g_loss has sigma detached, s_loss has samples detached
    opt_g.step(); opt_s.step()

``g_loss`` = -mean log (q*K)(y) with sigma detached (the spread-MLE objective of the generator);
``s_loss`` = -KL estimate with the samples detached (minimising it maximises the divergence).
"""
from __future__ import annotations

import math

import torch

from .._validate import check_kind, check_tensor
from ..ops.spread_log_likelihood import spread_log_likelihood
from ..ops.spread_noise import spread_noise

__all__ = ["LearnedSpread"]


class LearnedSpread(torch.nn.Module):
    """A learned per-dimension spread with a floor, for the max-min spread-divergence game.

    Args:
        dim: D, the number of features per example (the data are flattened to [N, D]).
        sigma: initial spread (float > min_sigma, or D values), std of Gaussian / scale b of
            Laplace noise.
        min_sigma: the floor (float >= 0, default 0.05 in data units): sigma_j > min_sigma always.
        kind: ``"gaussian"`` or ``"laplace"`` (uniform and other spreads with Fourier zeros are
            rejected by :func:`fastgen._validate.check_kind`).
        constraint: ``"volume"`` (default; geometric mean of sigma - min_sigma held at its
            initial value) or ``"none"`` (floor only). See the module docstring for why.

    Attributes: ``logits`` [D] (the trained parameter), ``sigma`` [D] (property).
    Raises: TypeError / ValueError for bad arguments (messages name the argument).
    """

    def __init__(self, dim: int, sigma=1.0, *, min_sigma: float = 0.05, kind: str = "gaussian",
                 constraint: str = "volume"):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an int >= 1, got {dim!r}")
        if isinstance(min_sigma, bool) or not isinstance(min_sigma, (int, float)) or not (
                math.isfinite(min_sigma) and min_sigma >= 0):
            raise ValueError(f"min_sigma must be a finite float >= 0, got {min_sigma!r}")
        if constraint not in ("volume", "none"):
            raise ValueError(f"constraint must be 'volume' or 'none', got {constraint!r}")
        self.kind = check_kind(kind)
        self.dim = dim
        self.min_sigma = float(min_sigma)
        self.constraint = constraint
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
            raise TypeError(f"sigma must be a float or a floating-point tensor, got {type(sigma).__name__}")
        s0 = sigma.detach().double().reshape(-1) if isinstance(sigma, torch.Tensor) else torch.tensor([float(sigma)],
                                                                                                      dtype=torch.float64)
        if s0.numel() not in (1, dim):
            raise ValueError(f"sigma must have 1 or dim = {dim} elements, got {s0.numel()}")
        if not bool((torch.isfinite(s0) & (s0 > self.min_sigma)).all()):
            raise ValueError(f"sigma must be finite and > min_sigma = {self.min_sigma}")
        s0 = s0.expand(dim)
        log_ex = torch.log(s0 - self.min_sigma)
        if constraint == "volume":
            self.register_buffer("log_scale", log_ex.mean().float())
            self.logits = torch.nn.Parameter((log_ex - log_ex.mean()).float().clone())
        else:
            self.register_buffer("log_scale", torch.zeros((), dtype=torch.float32))
            self.logits = torch.nn.Parameter(log_ex.float().clone())

    @property
    def sigma(self) -> torch.Tensor:
        """Current spread [D] (differentiable w.r.t. ``logits``); always > min_sigma."""
        a = self.logits
        if self.constraint == "volume":
            a = a - a.mean()
        return self.min_sigma + torch.exp(self.log_scale + a)

    def _flat(self, samples, data):
        check_tensor("samples", samples)
        check_tensor("data", data)
        if samples.dim() < 2 or data.dim() < 2 or samples.shape[1:] != data.shape[1:]:
            raise ValueError(f"samples [S, ...] and data [N, ...] must have the same trailing shape, got "
                             f"{tuple(samples.shape)} and {tuple(data.shape)}")
        x = samples.reshape(samples.shape[0], -1)
        d = data.reshape(data.shape[0], -1)
        if d.shape[1] != self.dim:
            raise ValueError(f"data have {d.shape[1]} features per example, the spread has dim = {self.dim}")
        return x, d

    def divergence(self, samples: torch.Tensor, data: torch.Tensor, generator=None) -> torch.Tensor:
        """Monte-Carlo KL(p*K || q*K), p = the empirical distribution of ``data``, q that of
        ``samples``: mean over y = data + sigma * eps of log p*K(y) - log q*K(y) (nats).
        Differentiable w.r.t. samples and sigma (through y too: the reparametrised noise)."""
        x, d = self._flat(samples, data)
        s = self.sigma.to(device=d.device, dtype=d.dtype)
        y = spread_noise(d, s, kind=self.kind, generator=generator)
        return (spread_log_likelihood(y, d, s, kind=self.kind) - spread_log_likelihood(y, x, s, kind=self.kind)).mean()

    def generator_loss(self, samples: torch.Tensor, data: torch.Tensor, generator=None) -> torch.Tensor:
        """The generator's objective -mean log (q*K)(data + noise) at the current spread, with
        sigma detached (the generator must not move the spread)."""
        x, d = self._flat(samples, data)
        s = self.sigma.detach().to(device=d.device, dtype=d.dtype)
        y = spread_noise(d, s, kind=self.kind, generator=generator)
        return -spread_log_likelihood(y, x, s, kind=self.kind).mean()

    def spread_loss(self, samples: torch.Tensor, data: torch.Tensor, generator=None) -> torch.Tensor:
        """-divergence with the samples detached: minimising it (any optimiser) maximises the
        divergence over the spread only."""
        return -self.divergence(samples.detach(), data, generator)

    def game_losses(self, samples: torch.Tensor, data: torch.Tensor, generator=None):
        """(generator_loss, spread_loss) on independent noise draws; their sum can be
        backpropagated once: each loss only reaches its own player."""
        return self.generator_loss(samples, data, generator), self.spread_loss(samples, data, generator)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, kind={self.kind!r}, min_sigma={self.min_sigma}, constraint={self.constraint!r}")
