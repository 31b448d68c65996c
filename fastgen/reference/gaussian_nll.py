"""Plain-torch reference of the Gaussian negative log-likelihood (ground truth for every backend).

With ``log_var=False`` and ``beta=0`` this is, operation for operation, the formula of
``torch.nn.functional.gaussian_nll_loss`` (torch 2.13): same var broadcasting, same eps clamp
applied under ``no_grad`` (so the gradient passes straight through the clamp), same result
dtype. Per element, with d = input - target:

    v    = max(var, eps)                      (or exp(log_var) when log_var=True; no clamp)
    nll  = 0.5 * (log v + d^2 / v) [+ 0.5 * log(2 pi) when full]
    loss = stop_grad(v) ** beta * nll         (beta-NLL, Seitzer et al. 2022, eq. 5)

then the mean, the sum or nothing over all elements.

Source: Nix & Weigend 1994 (the Gaussian NLL with learned variance); Seitzer, Tavakoli,
Antic & Martius, "On the Pitfalls of Heteroscedastic Uncertainty Estimation with Probabilistic
Neural Networks", ICLR 2022 (beta-NLL).
"""
from __future__ import annotations

import math

import torch

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def resolve_var_shape(input: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """torch's var size rule: var of input's size, or one dimension fewer (unsqueezed at the end),
    or input's size with exactly one mismatched dimension where var has size 1. Anything else
    raises ValueError("var is of incorrect size")."""
    if var.size() != input.size():
        if input.size()[:-1] == var.size():
            var = torch.unsqueeze(var, -1)
        elif input.ndim == var.ndim and sum(y for x, y in zip(input.size(), var.size()) if x != y) == 1:
            pass
        else:
            raise ValueError("var is of incorrect size")
    return var


def nll_formula(input: torch.Tensor, target: torch.Tensor, var: torch.Tensor, full: bool, eps: float,
                reduction: str, log_var: bool = False, beta: float = 0.0) -> torch.Tensor:
    """The loss for an already shape-checked tensor ``var`` (no negative-var check)."""
    if log_var:
        lv = var
        loss = 0.5 * (lv + (input - target) ** 2 * torch.exp(-lv))
        if full:
            loss = loss + HALF_LOG_2PI
        if beta != 0.0:
            loss = loss * torch.exp(beta * lv.detach())
    else:
        var = var.clone()
        with torch.no_grad():
            var.clamp_(min=eps)
        loss = 0.5 * (torch.log(var) + (input - target) ** 2 / var)
        if full:
            loss += HALF_LOG_2PI
        if beta != 0.0:
            loss = loss * var.detach() ** beta
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def gaussian_nll_loss(input: torch.Tensor, target: torch.Tensor, var, full: bool = False, eps: float = 1e-6,
                      reduction: str = "mean", *, log_var: bool = False, beta: float = 0.0) -> torch.Tensor:
    """Reference Gaussian NLL. ``var``: a tensor (variance, or log-variance when ``log_var``) or
    a float. Raises ValueError for a negative variance, a var of incorrect size or an unknown
    reduction, like torch."""
    if isinstance(var, float):
        if var < 0 and not log_var:
            raise ValueError("var has negative entry/entries")
        var = var * torch.ones_like(input)
    elif not log_var and torch.any(var < 0):
        raise ValueError("var has negative entry/entries")
    var = resolve_var_shape(input, var)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not valid")
    return nll_formula(input, target, var, full, eps, reduction, log_var, beta)
