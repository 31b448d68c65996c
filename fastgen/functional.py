"""The public functional surface of fastgen (names are a contract: see DESIGN.md)."""
from .ops.gaussian_nll import gaussian_nll_loss
from .ops.imle_loss import imle_loss
from .ops.knn import knn
from .ops.spread_log_likelihood import spread_log_likelihood
from .ops.spread_noise import spread_noise

__all__ = ["knn", "spread_noise", "gaussian_nll_loss", "imle_loss", "spread_log_likelihood"]
