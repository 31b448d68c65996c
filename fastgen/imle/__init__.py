"""IMLE (Li & Malik 2018): latent selection and samplers built on fastgen.knn."""
from .sampler import IMLESampler
from .select import select_latents

__all__ = ["select_latents", "IMLESampler"]
from .adaptive import AdaptiveIMLESampler
from .features import RandomProjection

__all__ += ["AdaptiveIMLESampler", "RandomProjection"]
from . import distributed
from .conditional import (CIMLEConfig, CIMLEResult, ConditionalMLPGenerator, default_cimle_config, make_condition,
                          select_conditional, train_cimle)

__all__ += ["distributed", "CIMLEConfig", "CIMLEResult", "ConditionalMLPGenerator", "default_cimle_config",
            "make_condition", "select_conditional", "train_cimle"]
