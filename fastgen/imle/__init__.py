"""IMLE (Li & Malik 2018): latent selection and samplers built on fastgen.knn."""
from .sampler import IMLESampler
from .select import select_latents

__all__ = ["select_latents", "IMLESampler"]
from .adaptive import AdaptiveIMLESampler
from .features import RandomProjection

__all__ += ["AdaptiveIMLESampler", "RandomProjection"]
