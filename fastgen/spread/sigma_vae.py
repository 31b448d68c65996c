"""sigma-VAE helpers: the optimal Gaussian decoder variance, computed analytically, and a soft
floor on log sigma (seed 002 "Maximum likelihood is meaningless"; Rybkin, Daniilidis & Levine
2021, "Simple and Effective VAE Training with Calibrated Decoders", ICML, arXiv 2006.13202).

A Gaussian decoder N(x; mu(z), sigma^2 I) whose variance is *learned* has the per-example
negative log-likelihood

    NLL = ||x - mu(z)||^2 / (2 sigma^2) + D log sigma + D/2 log 2 pi,

whose minimum over a shared sigma (the derivative in sigma set to zero) is reached at

    sigma^2* = ||x - mu(z)||^2 / D = MSE,   NLL* = D/2 (log(2 pi MSE) + 1).

When the decoder reconstructs the data ever better (data on a lower-dimensional manifold, a
finite data set that can be memorised, seed 002), MSE -> 0, sigma -> 0 and NLL* -> -infinity:
the likelihood grows without bound while nothing about the samples improves. The helpers here

* compute sigma^2* = MSE directly (:func:`optimal_sigma2`, :func:`optimal_log_sigma`), so that the
  decoder variance is always the calibrated one and no separate sigma parameter can run away;
* bound log sigma below with a *soft* floor (:func:`softclip`, Rybkin et al.'s
  ``min + softplus(x - min)``): smooth, gradient never exactly 0, and log sigma >= min, so the
  NLL of one example is bounded below by D (min + 1/2 log 2 pi);
* give the resulting NLL on :func:`fastgen.gaussian_nll_loss` (:func:`sigma_vae_nll`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops.gaussian_nll import gaussian_nll_loss

__all__ = ["softclip", "optimal_sigma2", "optimal_log_sigma", "sigma_vae_nll", "nll_lower_bound"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _check_pair(recon, target):
    if not isinstance(recon, torch.Tensor):
        raise TypeError(f"recon must be a torch.Tensor, got {type(recon).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if not recon.is_floating_point() or not target.is_floating_point():
        raise TypeError(f"recon and target must be floating point, got {recon.dtype} and {target.dtype}")
    if recon.shape != target.shape:
        raise ValueError(f"recon {tuple(recon.shape)} and target {tuple(target.shape)} must have the same shape")
    if recon.dim() < 1 or recon.numel() == 0:
        raise ValueError(f"recon must be non-empty, got shape {tuple(recon.shape)}")


def _check_min(min_log_sigma):
    if isinstance(min_log_sigma, bool) or not isinstance(min_log_sigma, (int, float)) or not math.isfinite(min_log_sigma):
        raise ValueError(f"min_log_sigma must be a finite float, got {min_log_sigma!r}")
    return float(min_log_sigma)


def softclip(x: torch.Tensor, min_value: float) -> torch.Tensor:
    """Soft floor ``min_value + softplus(x - min_value)`` (Rybkin et al. 2021, their ``softclip``).

    Smooth and strictly increasing; >= min_value everywhere (equal only as x -> -inf); within
    softplus(-t) ~ e^-t of x once x is t above the floor. Use it on log sigma (not on sigma):
    the NLL then stays bounded below by D (min_value + 1/2 log 2 pi) per example.

    Args:
        x: any floating tensor. min_value: the floor, a finite float.
    Returns: a tensor of x's shape and dtype.
    Raises: TypeError for a non-tensor x; ValueError for a non-finite min_value.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    m = _check_min(min_value)
    return m + F.softplus(x - m)


def optimal_sigma2(recon: torch.Tensor, target: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """The maximum-likelihood variance of a Gaussian decoder with mean ``recon``: the mean
    squared error ``mean((target - recon)^2)`` over ``dim``.

    ``dim=None`` (the sigma-VAE default): one sigma shared by every element of the batch, a 0-d
    tensor. ``dim=-1`` (or a tuple): one sigma per example (per row). ``dim=0``: one per feature.
    The result is differentiable (at the optimum the NLL's derivative in sigma is 0, so the
    gradient w.r.t. recon equals that of the NLL at fixed sigma = sqrt(MSE)).

    Args:
        recon: decoder means [..., D] (float). target: the data, same shape.
    Returns: float tensor, the MSE reduced over ``dim``; can be 0 (use :func:`optimal_log_sigma`
        for a floored log sigma).
    Raises: TypeError / ValueError for non-tensors, non-float or mismatched shapes.
    """
    _check_pair(recon, target)
    se = (target - recon).square()
    if dim is None:
        return se.mean()
    return se.mean(dim=dim, keepdim=keepdim)


def optimal_log_sigma(recon: torch.Tensor, target: torch.Tensor, *, dim=None, keepdim: bool = False,
                      min_log_sigma: float = -6.0) -> torch.Tensor:
    """``softclip(0.5 log MSE, min_log_sigma)``: the analytic optimal log sigma of a Gaussian
    decoder (:func:`optimal_sigma2`) with a soft floor (Rybkin et al. 2021 use -6).

    A zero MSE gives exactly ``min_log_sigma`` (the log is taken of MSE clamped at the smallest
    normal float of the dtype, so there is no inf / NaN in forward or backward)."""
    m = _check_min(min_log_sigma)
    mse = optimal_sigma2(recon, target, dim=dim, keepdim=keepdim)
    tiny = torch.finfo(mse.dtype).tiny
    return softclip(0.5 * torch.log(mse.clamp_min(tiny)), m)


def sigma_vae_nll(recon: torch.Tensor, target: torch.Tensor, log_sigma=None, *, min_log_sigma: float = -6.0,
                  reduction: str = "mean") -> torch.Tensor:
    """Gaussian decoder negative log-likelihood with the *full* constant, in nats:

        nll_n = sum_j [ (x_nj - mu_nj)^2 / (2 sigma^2) + log sigma + 1/2 log 2 pi ]

    computed by :func:`fastgen.gaussian_nll_loss` (``full=True, log_var=True``).

    Args:
        recon: decoder means [N, ...]; target: data [N, ...] (same shape; features are all
            dims after the first).
        log_sigma: ``None`` (default): the shared analytic optimum
            :func:`optimal_log_sigma` (``dim=None``) with the soft floor ``min_log_sigma``.
            Otherwise a tensor of log sigma (0-d, or [N] for one per example, or recon's shape),
            used as is (the floor is *not* applied: wrap it in :func:`softclip` yourself).
        reduction: ``"mean"`` (mean over the N examples of the per-example sum: nats per
            example), ``"sum"``, or ``"none"`` ([N]).
    Returns: a 0-d tensor, or [N] for reduction="none".
    Raises: TypeError / ValueError for bad inputs (messages name the argument).
    """
    _check_pair(recon, target)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if recon.dim() < 2:
        raise ValueError(f"recon must be [N, ...] with a batch dim, got shape {tuple(recon.shape)}")
    N = recon.shape[0]
    x = recon.reshape(N, -1)
    t = target.reshape(N, -1)
    if log_sigma is None:
        log_sigma = optimal_log_sigma(x, t, min_log_sigma=min_log_sigma)
    if not isinstance(log_sigma, torch.Tensor):
        raise TypeError(f"log_sigma must be a tensor or None, got {type(log_sigma).__name__}")
    if log_sigma.numel() == 1:
        lv = (2 * log_sigma).reshape(1, 1).expand(N, 1)
    elif log_sigma.shape == (N,):
        lv = (2 * log_sigma).reshape(N, 1)
    elif log_sigma.shape == recon.shape:
        lv = (2 * log_sigma).reshape(N, -1)
    else:
        raise ValueError(f"log_sigma of shape {tuple(log_sigma.shape)} must have 1 element, [N] = [{N}] or recon's "
                         f"shape {tuple(recon.shape)}")
    per = gaussian_nll_loss(x, t, lv, full=True, log_var=True, reduction="none").sum(1)
    if reduction == "none":
        return per
    return per.sum() if reduction == "sum" else per.mean()


def nll_lower_bound(num_features: int, min_log_sigma: float = -6.0) -> float:
    """The per-example NLL can never go below D (min_log_sigma + 1/2 log 2 pi) when
    log sigma >= min_log_sigma (the squared-error term is >= 0)."""
    if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be an int >= 1, got {num_features!r}")
    return num_features * (_check_min(min_log_sigma) + _HALF_LOG_2PI)
