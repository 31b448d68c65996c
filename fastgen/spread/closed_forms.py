"""Closed forms of spread KL divergences (Zhang, Gao, Agakov & Barber 2019, arXiv 1811.08968;
seed 001 "Training models that have zero likelihood").

Spreading p and q with the same stationary noise K (y = x + sigma * eps) makes KL(p*K || q*K)
finite for distributions with different supports, and zero iff p = q when K's Fourier transform
is strictly positive (Gaussian, Laplace; not uniform).

* Two deltas p = delta(mu_p), q = delta(mu_q): p*K and q*K are K shifted to mu_p and mu_q.
  Gaussian K of std sigma: KL = (mu_p - mu_q)^2 / (2 sigma^2).
  Laplace K of scale b:    KL = |d| / b + exp(-|d| / b) - 1,  d = mu_p - mu_q.
  For D-dimensional deltas spread by independent noise in each dimension, K factorises and the
  KL is the sum over dimensions of these per-dimension values.
* Gaussians N(m1, s1^2), N(m2, s2^2) with Gaussian spread of std sigma:
  KL(N(m1, s1^2 + sigma^2) || N(m2, s2^2 + sigma^2))
  = 1/2 [log(v2 / v1) + (v1 + (m1 - m2)^2) / v2 - 1],  v_i = s_i^2 + sigma^2.
"""
from __future__ import annotations

import math
from numbers import Real

import torch

from .._validate import check_kind

__all__ = ["kl_two_deltas", "kl_gaussians"]


def _as_value(name: str, v):
    if isinstance(v, bool) or not isinstance(v, (Real, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a floating-point tensor, got {type(v).__name__}")
    if isinstance(v, torch.Tensor):
        if not (v.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        return v
    return float(v)


def _check_positive(name: str, v, *, strict: bool):
    bad = (lambda t: not bool((t > 0).all())) if strict else (lambda t: not bool((t >= 0).all()))
    if isinstance(v, torch.Tensor):
        if v.numel() and bad(v.detach()):
            raise ValueError(f"{name} must be {'> 0' if strict else '>= 0'} everywhere")
    elif not (v > 0 if strict else v >= 0):  # also rejects NaN
        raise ValueError(f"{name} must be {'> 0' if strict else '>= 0'}, got {v!r}")


def _any_tensor(*vs) -> bool:
    return any(isinstance(v, torch.Tensor) for v in vs)


def kl_two_deltas(mu_p, mu_q, sigma, kind: str = "gaussian"):
    """KL(delta(mu_p) * K || delta(mu_q) * K) for spread noise K of scale ``sigma``.

    Args:
        mu_p, mu_q: locations (floats or tensors, broadcast elementwise).
        sigma: noise scale > 0: std of the Gaussian, scale b of the Laplace (float or tensor).
        kind: ``"gaussian"``: (mu_p - mu_q)^2 / (2 sigma^2); ``"laplace"``:
            |d| / b + exp(-|d| / b) - 1 (computed with expm1 for small |d| / b).

    Returns:
        Elementwise KL in nats: a float when every argument is a float, else a tensor of the
        broadcast shape. For a D-dimensional delta, sum the result over the dimensions
        (independent spread noise per dimension factorises the KL).

    Raises:
        TypeError: a non-numeric argument or integer tensor.
        ValueError: sigma <= 0 or NaN; an unknown kind (uniform noise is not a valid spread).
    """
    kind = check_kind(kind)
    mu_p, mu_q, sigma = _as_value("mu_p", mu_p), _as_value("mu_q", mu_q), _as_value("sigma", sigma)
    _check_positive("sigma", sigma, strict=True)
    if not _any_tensor(mu_p, mu_q, sigma):
        z = abs(mu_p - mu_q) / sigma
        return 0.5 * z * z if kind == "gaussian" else z + math.expm1(-z)
    z = torch.as_tensor(mu_p - mu_q).abs() / sigma
    return 0.5 * z * z if kind == "gaussian" else z + torch.expm1(-z)


def kl_gaussians(m1, s1, m2, s2, sigma):
    """KL(N(m1, s1^2 + sigma^2) || N(m2, s2^2 + sigma^2)): two Gaussians spread by Gaussian
    noise of std sigma.

    Args:
        m1, s1: mean and std (>= 0; 0 is a delta) of p. m2, s2: those of q.
        sigma: std of the spread noise, > 0. Floats or tensors, broadcast elementwise.

    Returns:
        KL in nats, per element (sum over dimensions for diagonal multivariate Gaussians); a
        float when every argument is a float, else a tensor.

    Raises:
        TypeError: a non-numeric argument. ValueError: sigma <= 0, s1 < 0 or s2 < 0 (or NaN).
    """
    m1, s1, m2, s2, sigma = (_as_value(n, v) for n, v in
                             (("m1", m1), ("s1", s1), ("m2", m2), ("s2", s2), ("sigma", sigma)))
    _check_positive("sigma", sigma, strict=True)
    _check_positive("s1", s1, strict=False)
    _check_positive("s2", s2, strict=False)
    v1 = s1 * s1 + sigma * sigma
    v2 = s2 * s2 + sigma * sigma
    if not _any_tensor(m1, s1, m2, s2, sigma):
        return 0.5 * (math.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)
    v1, v2 = torch.as_tensor(v1), torch.as_tensor(v2)
    return 0.5 * (torch.log(v2 / v1) + (v1 + torch.as_tensor(m1 - m2) ** 2) / v2 - 1.0)
