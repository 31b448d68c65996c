"""Module forms of fastgen's losses."""
from .gaussian_nll import GaussianNLLLoss
from .imle import IMLELoss
from .spread import SpreadDivergenceLoss

__all__ = ["GaussianNLLLoss", "IMLELoss", "SpreadDivergenceLoss"]
