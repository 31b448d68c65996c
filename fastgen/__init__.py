"""fastgen: fast likelihood-free training of implicit generative models.

IMLE (Li & Malik 2018) and spread divergence (Zhang, Gao, Agakov & Barber 2019) on exact
batched nearest-neighbour search and fused kernels. See README.md and DESIGN.md.
"""
from .functional import gaussian_nll_loss, imle_loss, knn, spread_log_likelihood, spread_noise
from . import imle, nn, spread  # noqa: E402

__version__ = "0.1.0"
__all__ = ["knn", "spread_noise", "gaussian_nll_loss", "imle_loss", "spread_log_likelihood",
           "nn", "imle", "spread", "__version__"]
