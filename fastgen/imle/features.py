"""Feature maps for the nearest-neighbour search of IMLE (``feature_fn`` of
:func:`fastgen.imle.select_latents` and the samplers).

Adaptive IMLE (Aghabozorgi, Peng, Li, ICLR 2023) searches nearest neighbours in a fixed random
projection of the images (their ``proj_dim``) rather than in pixel space: a Gaussian random
matrix preserves squared Euclidean distances in expectation (Johnson-Lindenstrauss), and a
smaller feature size makes the search cheaper.
"""
from __future__ import annotations

import math

import torch


class RandomProjection(torch.nn.Module):
    """A fixed, seeded Gaussian random projection x [n, ...] -> x.flatten(1) @ W [n, dim].

    W [in_features, dim] has i.i.d. N(0, 1 / dim) entries, so that
    E ||(x - y) W||^2 = ||x - y||^2 (the projection preserves squared distances in
    expectation; Johnson-Lindenstrauss). W is drawn from ``torch.Generator().manual_seed(seed)``
    on the CPU in float32, so the same (in_features, dim, seed) gives the same W on every
    machine and device; it is a buffer (saved in ``state_dict``, moved by ``.to()``), never a
    parameter. ``in_features`` may be left out: W is then drawn at the first call from the
    flattened size of the input (a lazy module; the draw does not depend on the input's values).

    The output has the input's dtype (W is cast to it) and device.

    Args:
        dim: output feature size (>= 1).
        in_features: flattened size of one input (optional, see above).
        seed: seed of the projection (int).

    Raises:
        TypeError / ValueError naming the argument for a non-int or < 1 ``dim`` /
        ``in_features``, a non-int ``seed``; at call time a non-tensor input, an input with
        fewer than 2 dims, an integer dtype, or a flattened size different from ``in_features``.
    """

    def __init__(self, dim: int, in_features: int | None = None, *, seed: int = 0):
        super().__init__()
        for name, v in (("dim", dim), ("in_features", in_features)):
            if v is None and name == "in_features":
                continue
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.dim = dim
        self.seed = seed
        self.in_features = in_features
        self.register_buffer("weight", self._draw(in_features) if in_features is not None else torch.empty(0))

    def _draw(self, in_features: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(in_features, self.dim, generator=g) / math.sqrt(self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"x must be [n, ...] with at least 2 dims, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        flat = x.reshape(x.shape[0], -1)
        if self.in_features is None:
            self.in_features = flat.shape[1]
            self.weight = self._draw(self.in_features).to(x.device)
        if flat.shape[1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features per row (flattened), got {flat.shape[1]}")
        return flat @ self.weight.to(device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, dim={self.dim}, seed={self.seed}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        w = state_dict.get(prefix + "weight")
        if isinstance(w, torch.Tensor) and w.dim() == 2 and self.weight.numel() == 0:
            self.weight = torch.empty_like(w)       # lazy module: take the saved shape
            self.in_features = w.shape[0]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
