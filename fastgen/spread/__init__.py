"""Spread divergence (Zhang, Gao, Agakov & Barber 2019, arXiv 1811.08968): closed forms and training helpers."""
from .closed_forms import kl_gaussians, kl_two_deltas
from .learned import LearnedSpread
from .sigma_vae import nll_lower_bound, optimal_log_sigma, optimal_sigma2, sigma_vae_nll, softclip
from .vae import SpreadVAE, SpreadVAEOutput, gaussian_kl_standard, spread_vae_loss

__all__ = ["kl_two_deltas", "kl_gaussians", "SpreadVAE", "SpreadVAEOutput", "spread_vae_loss", "gaussian_kl_standard",
           "LearnedSpread", "optimal_sigma2", "optimal_log_sigma", "softclip", "sigma_vae_nll", "nll_lower_bound"]
