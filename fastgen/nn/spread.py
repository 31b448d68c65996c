"""Spread divergence loss (Zhang, Gao, Agakov & Barber 2019, arXiv 1811.08968; seed 001).

A deterministic generator x = g(z) has zero likelihood off its manifold, so maximum likelihood is
undefined. Spreading both the data and the model with the same noise K (Gaussian or Laplace: a
strictly positive Fourier transform) gives densities with common support, and

    KL(p*K || q*K) = E_{y ~ p*K}[log p*K(y)] - E_{y ~ p*K}[log q*K(y)]

is finite and zero iff p = q. The first term does not depend on the model, so training the
generator minimises the cross-entropy -E_{y ~ p*K} log q*K(y), estimated with y = data + noise and
the Monte-Carlo density log q*K(y) ~ log 1/S sum_s K(y - g(z_s)) (fastgen.spread_log_likelihood).
"""
from __future__ import annotations

import torch

from .._validate import check_kind, check_tensor
from ..ops.spread_log_likelihood import spread_log_likelihood
from ..ops.spread_noise import spread_noise

__all__ = ["SpreadDivergenceLoss"]


class SpreadDivergenceLoss(torch.nn.Module):
    """``loss(samples, data) = -mean_n log (q*K)(data_n + noise_n)``.

    Args:
        sigma: spread scale: std of Gaussian noise, scale b of Laplace noise. A float > 0, or a
            tensor > 0 with 1 element, D elements, or the trailing shape of the data (a
            per-dimension spread; D = the number of features per example).
        kind: ``"gaussian"`` or ``"laplace"``. Uniform noise (Fourier transform with zeros) is
            rejected: the spread divergence would not identify p = q.
        learn_sigma: make the spread a ``torch.nn.Parameter``. It is parametrised as
            ``sigma = min_sigma + exp(log_excess)`` so that it stays positive and cannot collapse
            below the floor ``min_sigma``. In the spread-divergence game the spread is trained to
            *maximise* the divergence while the generator minimises it: step ``log_excess`` with
            an optimiser built with ``maximize=True`` on :meth:`divergence`, not on this loss
            (the cross-entropy alone decreases as sigma grows).
        min_sigma: the floor of a learned sigma (default 1e-3); ignored when learn_sigma=False.
        num_draws: noise draws per data example (the mean over draws lowers the variance).
        antithetic: also use the mirrored draw data - noise for every data + noise (the noise
            law is symmetric, so the pair is unbiased and its linear error terms cancel).

    forward(samples, data, generator=None):
        samples [S, ...] (generator outputs g(z_s), differentiable) and data [N, ...] with the
        same trailing shape, flattened to [S, D] and [N, D]. Returns a 0-d tensor (nats per
        example). ``generator`` seeds the noise (a ``torch.Generator``).

    Raises:
        ValueError / TypeError from the constructor for a bad sigma, kind, min_sigma, num_draws;
        from forward for mismatched shapes (messages name the argument).
    """

    def __init__(self, sigma, *, kind: str = "gaussian", learn_sigma: bool = False, min_sigma: float = 1e-3,
                 num_draws: int = 1, antithetic: bool = False):
        super().__init__()
        self.kind = check_kind(kind)
        if not isinstance(learn_sigma, bool):
            raise TypeError(f"learn_sigma must be a bool, got {type(learn_sigma).__name__}")
        if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
            raise ValueError(f"num_draws must be an int >= 1, got {num_draws!r}")
        if not isinstance(antithetic, bool):
            raise TypeError(f"antithetic must be a bool, got {type(antithetic).__name__}")
        self.num_draws = num_draws
        self.antithetic = antithetic
        self.learn_sigma = learn_sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
            raise TypeError(f"sigma must be a float or a floating-point tensor, got {type(sigma).__name__}")
        s0 = sigma.detach().clone() if isinstance(sigma, torch.Tensor) else torch.tensor(float(sigma))
        if not s0.is_floating_point():
            raise TypeError(f"sigma must be a floating-point tensor, got {s0.dtype}")
        if s0.numel() == 0 or not bool(((s0 > 0) & torch.isfinite(s0)).all()):
            raise ValueError("sigma must be finite and > 0")
        if learn_sigma:
            if isinstance(min_sigma, bool) or not isinstance(min_sigma, (int, float)) or not min_sigma >= 0:
                raise ValueError(f"min_sigma must be a float >= 0, got {min_sigma!r}")
            if not bool((s0 > min_sigma).all()):
                raise ValueError(f"sigma must be > min_sigma = {min_sigma} when learn_sigma=True")
            self.min_sigma = float(min_sigma)
            self.log_excess = torch.nn.Parameter(torch.log(s0.float() - self.min_sigma))
        else:
            self.min_sigma = 0.0
            self.register_buffer("_sigma", s0.float())

    @property
    def sigma(self) -> torch.Tensor:
        """The current spread (a tensor; differentiable w.r.t. ``log_excess`` when learned)."""
        if self.learn_sigma:
            return self.min_sigma + torch.exp(self.log_excess)
        return self._sigma

    def _flat(self, samples, data):
        check_tensor("samples", samples)
        check_tensor("data", data)
        if samples.dim() < 2 or data.dim() < 2:
            raise ValueError(f"samples [S, ...] and data [N, ...] need a batch dim and features, got shapes "
                             f"{tuple(samples.shape)} and {tuple(data.shape)}")
        if samples.shape[1:] != data.shape[1:]:
            raise ValueError(f"samples {tuple(samples.shape)} and data {tuple(data.shape)} must have the same "
                             "trailing shape")
        x = samples.reshape(samples.shape[0], -1)
        d = data.reshape(data.shape[0], -1)
        D = x.shape[1]
        s = self.sigma.to(device=x.device)
        if s.numel() == 1:
            s = s.reshape(())
        elif s.numel() == D and (s.dim() == 1 or s.shape == data.shape[1:]):
            s = s.reshape(D)
        else:
            raise ValueError(f"sigma of shape {tuple(s.shape)} must have 1 or D = {D} elements "
                             f"(data trailing shape {tuple(data.shape[1:])})")
        return x, d, s

    def _spread(self, d, s, generator):
        if self.num_draws > 1:
            d = d.repeat(self.num_draws, 1)
        y = spread_noise(d, s, kind=self.kind, generator=generator)
        if self.antithetic:
            y = torch.cat([y, 2 * d - y], 0)
        return y

    def forward(self, samples: torch.Tensor, data: torch.Tensor, generator=None) -> torch.Tensor:
        x, d, s = self._flat(samples, data)
        y = self._spread(d, s, generator)
        return -spread_log_likelihood(y, x, s, kind=self.kind).mean()

    def divergence(self, samples: torch.Tensor, data: torch.Tensor, generator=None) -> torch.Tensor:
        """Monte-Carlo estimate of KL(p*K || q*K) with p the empirical distribution of ``data``:
        mean over y = data + noise of log p*K(y) - log q*K(y), both log-densities by
        :func:`fastgen.spread_log_likelihood` (the first one exact for the empirical p). The
        quantity the spread is trained to maximise when learn_sigma=True."""
        x, d, s = self._flat(samples, data)
        y = self._spread(d, s, generator)
        return (spread_log_likelihood(y, d, s, kind=self.kind) - spread_log_likelihood(y, x, s, kind=self.kind)).mean()

    def extra_repr(self) -> str:
        s = self.sigma.detach()
        sv = f"{s.item():.4g}" if s.numel() == 1 else f"[{s.numel()}]"
        return (f"sigma={sv}, kind={self.kind!r}, learn_sigma={self.learn_sigma}"
                + (f", min_sigma={self.min_sigma}" if self.learn_sigma else "")
                + (f", num_draws={self.num_draws}" if self.num_draws > 1 else "")
                + (", antithetic=True" if self.antithetic else ""))

