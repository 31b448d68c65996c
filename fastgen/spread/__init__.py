"""Spread divergence (Zhang, Gao, Agakov & Barber 2019, arXiv 1811.08968): closed forms and training helpers."""
from .closed_forms import kl_gaussians, kl_two_deltas

__all__ = ["kl_two_deltas", "kl_gaussians"]
