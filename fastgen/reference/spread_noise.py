"""Plain-torch reference of :func:`fastgen.spread_noise`: ``y = x + sigma * eps``.

The fused backends generate ``eps`` from a counter-based generator and never store it; the
reference takes ``eps`` explicitly, so that tests can feed a backend's own noise (recovered with
``x = 0``, ``sigma = 1``) and compare values and autograd gradients exactly.
"""
from __future__ import annotations

import math

import torch


def spread_noise_reference(x: torch.Tensor, sigma, eps: torch.Tensor) -> torch.Tensor:
    """``x + sigma * eps`` computed in float64 and cast back to ``x.dtype``.

    Differentiable w.r.t. ``x`` and ``sigma`` by plain autograd: ``grad_x = grad_y`` and
    ``grad_sigma = sum(eps * grad_y)`` over the dimensions along which sigma is broadcast."""
    s = sigma.double() if isinstance(sigma, torch.Tensor) else float(sigma)
    return (x.double() + s * eps.double()).to(x.dtype)


def sample_noise_reference(shape, kind: str = "gaussian", *, generator=None, dtype=torch.float64,
                           device="cpu") -> torch.Tensor:
    """Draws of the unit spread law with torch's own samplers: N(0, 1), or Laplace(0, 1) (scale
    b = 1: density exp(-|e|) / 2, variance 2)."""
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if kind == "laplace":
        mag = torch.empty(shape, dtype=dtype, device=device).exponential_(1.0, generator=generator)
        sign = torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1
        return mag * sign
    raise ValueError(f"kind must be 'gaussian' or 'laplace', got {kind!r}")


def unit_cdf(kind: str):
    """The CDF of the unit spread law, for Kolmogorov-Smirnov tests (vectorised over numpy arrays)."""
    import numpy as np

    if kind == "gaussian":
        from scipy.special import ndtr

        return ndtr
    if kind == "laplace":
        return lambda e: np.where(e < 0, 0.5 * np.exp(np.minimum(e, 0)), 1 - 0.5 * np.exp(-np.maximum(e, 0)))
    raise ValueError(f"kind must be 'gaussian' or 'laplace', got {kind!r}")


def unit_variance(kind: str) -> float:
    """Variance of the unit spread law: 1 (Gaussian), 2 (Laplace with b = 1)."""
    return {"gaussian": 1.0, "laplace": 2.0}[kind]


def unit_log_density(e: torch.Tensor, kind: str) -> torch.Tensor:
    """log density of the unit law at ``e``: -e^2/2 - log(2 pi)/2, or -|e| - log 2."""
    if kind == "gaussian":
        return -0.5 * e * e - 0.5 * math.log(2 * math.pi)
    if kind == "laplace":
        return -e.abs() - math.log(2.0)
    raise ValueError(f"kind must be 'gaussian' or 'laplace', got {kind!r}")
