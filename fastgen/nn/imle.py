"""Module form of fastgen.imle_loss."""
from __future__ import annotations

import torch

from .._validate import check_reduction
from ..ops.imle_loss import check_backend, check_radius, imle_loss


class IMLELoss(torch.nn.Module):
    """IMLE loss as a module: ``IMLELoss(...)(samples, data)`` = ``fastgen.imle_loss(samples,
    data, ...)`` (Li & Malik 2018). See :func:`fastgen.imle_loss` for shapes, the conditional
    form, RS-IMLE (``rejection_radius``) and errors; arguments are checked at construction.
    """

    def __init__(self, *, conditional: bool = False, rejection_radius: float = 0.0,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if not isinstance(conditional, bool):
            raise TypeError(f"conditional must be a bool, got {type(conditional).__name__}")
        check_backend(backend)
        self.conditional = conditional
        self.rejection_radius = check_radius(rejection_radius)
        self.reduction = check_reduction(reduction)
        self.backend = backend

    def forward(self, samples: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        return imle_loss(samples, data, conditional=self.conditional, rejection_radius=self.rejection_radius,
                         reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"conditional={self.conditional}, rejection_radius={self.rejection_radius}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")
