"""IMLE (Li & Malik 2018): latent selection and samplers built on fastgen.knn."""
from .sampler import IMLESampler
from .select import select_latents

__all__ = ["select_latents", "IMLESampler"]
