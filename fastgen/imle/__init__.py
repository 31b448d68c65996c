"""IMLE (Li & Malik 2018): latent selection and samplers built on fastgen.knn; RS-IMLE, Adaptive
IMLE, conditional IMLE and data-parallel training."""
from . import distributed
from .adaptive import AdaptiveIMLESampler
from .conditional import (CIMLEConfig, CIMLEResult, ConditionalMLPGenerator, default_cimle_config, make_condition,
                          select_conditional, train_cimle)
from .features import RandomProjection
from .sampler import IMLESampler
from .select import select_latents

__all__ = ["select_latents", "IMLESampler", "AdaptiveIMLESampler", "RandomProjection", "distributed",
           "CIMLEConfig", "CIMLEResult", "ConditionalMLPGenerator", "default_cimle_config", "make_condition",
           "select_conditional", "train_cimle"]
