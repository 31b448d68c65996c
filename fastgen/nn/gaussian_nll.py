"""fastgen.nn.GaussianNLLLoss: drop-in for torch.nn.GaussianNLLLoss on the fused kernels."""
from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

from ..ops.gaussian_nll import gaussian_nll_loss


class GaussianNLLLoss(_Loss):
    r"""Gaussian negative log-likelihood loss; see :func:`fastgen.gaussian_nll_loss`.

    Same constructor arguments, attributes (``full``, ``eps``, ``reduction``), shapes, values,
    gradients and errors as ``torch.nn.GaussianNLLLoss`` (invalid ``reduction`` raises in
    ``forward``, like torch), plus:

    Args:
        log_var: ``forward``'s third argument is the log-variance (no eps clamp).
        beta: beta-NLL exponent >= 0 (Seitzer et al., ICLR 2022): each element's loss is
            weighted by ``stop_grad(var) ** beta``.
        check_var: raise for a negative var (torch's check, the op's one host sync on GPU);
            False skips it (CUDA-graph capture). See :func:`fastgen.gaussian_nll_loss`.

    Shape:
        input ``(N, *)`` or ``(*)``; target: same shape or broadcastable; var: same shape as
        input, or one dimension fewer, or one dimension of size 1, or a float; output: scalar
        for ``"mean"`` / ``"sum"``, the broadcast shape for ``"none"``.

    Raises:
        TypeError / ValueError at construction for a non-numeric or negative ``beta`` or a
        non-numeric ``eps``; in ``forward`` like :func:`fastgen.gaussian_nll_loss`.
    """

    __constants__ = ["full", "eps", "reduction", "log_var", "beta", "check_var"]
    full: bool
    eps: float
    log_var: bool
    beta: float
    check_var: bool

    def __init__(self, full: bool = False, eps: float = 1e-6, reduction: str = "mean", *,
                 log_var: bool = False, beta: float = 0.0, check_var: bool = True) -> None:
        super().__init__(None, None, reduction)
        for name, val in (("eps", eps), ("beta", beta)):
            if isinstance(val, bool) or not isinstance(val, (int, float)):
                raise TypeError(f"{name} must be a float, got {type(val).__name__}")
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.full = full
        self.eps = eps
        self.log_var = log_var
        self.beta = beta
        self.check_var = check_var

    def forward(self, input: torch.Tensor, target: torch.Tensor, var) -> torch.Tensor:
        return gaussian_nll_loss(input, target, var, full=self.full, eps=self.eps, reduction=self.reduction,
                                 log_var=self.log_var, beta=self.beta, check_var=self.check_var)

    def extra_repr(self) -> str:
        s = f"full={self.full}, eps={self.eps}, reduction={self.reduction!r}"
        if self.log_var:
            s += ", log_var=True"
        if self.beta:
            s += f", beta={self.beta}"
        if not self.check_var:
            s += ", check_var=False"
        return s
