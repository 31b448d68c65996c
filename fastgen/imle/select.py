"""Latent selection for IMLE (Li & Malik 2018, arXiv 1809.09087, Algorithm 1, the inner loop):
for every data example, the candidate latent whose sample is nearest.

The pool of candidates is streamed through the generator and :func:`fastgen.knn` in chunks
under ``torch.no_grad``, keeping one running best per example: memory is O(N * latent_dim +
batch_size * D), independent of ``pool_size``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .._validate import check_finite, check_positive_int, check_tensor
from ..ops.imle_loss import check_backend, check_radius, nearest_eligible

DEFAULT_BATCH = 8192


def _features(x: torch.Tensor, feature_fn, name: str) -> torch.Tensor:
    f = feature_fn(x) if feature_fn is not None else x
    if not isinstance(f, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
    if f.dim() < 1 or f.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have {x.shape[0]} rows, got shape {tuple(f.shape)}")
    return f.reshape(f.shape[0], -1)


def select_latents(generator: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, *,
                   pool_size: int | None = None, latent_dim: int, batch_size: int | None = None,
                   rejection_radius: float = 0.0, feature_fn: Callable | None = None,
                   latent_sampler: Callable[[int], torch.Tensor] | None = None,
                   rng: torch.Generator | None = None, backend: str = "auto"):
    """Pick, for each data example, the pool latent whose generated sample is nearest.

    Args:
        generator: callable z [n, latent_dim] -> samples [n, ...] (an nn.Module or a function);
            called under ``torch.no_grad`` on chunks of at most ``batch_size`` latents. Its mode
            (train / eval) is left as it is.
        data: [N, ...] float tensor of examples; samples must have the same trailing shape
            (or ``feature_fn`` must map both to the same feature size).
        pool_size: number of candidate latents (default 10 * N, Ke Li's reference).
        latent_dim: size of one latent.
        batch_size: candidates per chunk (default min(pool_size, 8192)); bounds the memory.
        rejection_radius: RS-IMLE (Vashist et al. 2024): candidates whose sample lies at
            Euclidean distance < rejection_radius from example i (in feature space) are
            rejected for example i before the pick. An example for which every candidate of
            the pool is rejected gets the nearest candidate overall (plain IMLE); such
            examples are the ones with ``dist2 < rejection_radius ** 2``.
        feature_fn: optional callable mapping data and samples [n, ...] -> features [n, F]
            (NN search in a feature space, e.g. a random projection as in Adaptive IMLE, or a
            user network). Distances are then feature-space distances.
        latent_sampler: callable n -> [n, latent_dim] drawing candidates; default
            ``torch.randn(n, latent_dim, generator=rng)`` on data's device, float32.
        rng: torch.Generator for the default sampler (reproducible pools).
        backend: backend of :func:`fastgen.knn`.

    Returns:
        (latents [N, latent_dim] in the sampler's dtype on data's device,
         dist2 float32 [N]: squared Euclidean distance from each example to its sample).
        Ties go to the earliest candidate of the pool.

    Raises:
        TypeError: ``data`` not a float tensor, sampler or generator returning a non-tensor.
        ValueError: empty or non-finite data, pool_size / latent_dim / batch_size < 1, a
            sampler returning the wrong shape, a generator output whose features do not match
            the data's, NaN / inf samples, rejection_radius < 0.
    """
    check_tensor("data", data)
    if data.dim() < 1:
        raise ValueError("data must be [N, ...]")
    N = data.shape[0]
    check_positive_int("latent_dim", latent_dim)
    pool_size = 10 * N if pool_size is None else check_positive_int("pool_size", pool_size)
    batch_size = min(pool_size, DEFAULT_BATCH) if batch_size is None else check_positive_int("batch_size", batch_size)
    r = check_radius(rejection_radius)
    check_backend(backend)
    if not callable(generator):
        raise TypeError(f"generator must be callable, got {type(generator).__name__}")
    if feature_fn is not None and not callable(feature_fn):
        raise TypeError(f"feature_fn must be callable, got {type(feature_fn).__name__}")
    device = data.device
    if latent_sampler is None:
        def latent_sampler(n):
            return torch.randn(n, latent_dim, generator=rng, device=device)
    elif not callable(latent_sampler):
        raise TypeError(f"latent_sampler must be callable, got {type(latent_sampler).__name__}")

    with torch.no_grad():
        check_finite("data", data)
        xf = torch.cat([_features(data[s:s + batch_size], feature_fn, "feature_fn(data)")
                        for s in range(0, N, batch_size)]) if feature_fn is not None else data.reshape(N, -1)
        xf = xf[None]                                                 # [1, N, F]
        best_d = torch.full((N,), float("inf"), dtype=torch.float32, device=device)
        best_z = None
        fb_d = fb_z = None
        for start in range(0, pool_size, batch_size):
            n = min(batch_size, pool_size - start)
            z = latent_sampler(n)
            if not isinstance(z, torch.Tensor):
                raise TypeError(f"latent_sampler must return a torch.Tensor, got {type(z).__name__}")
            if tuple(z.shape) != (n, latent_dim):
                raise ValueError(f"latent_sampler({n}) must return shape ({n}, {latent_dim}), got {tuple(z.shape)}")
            z = z.to(device)
            out = generator(z)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"generator must return a torch.Tensor, got {type(out).__name__}")
            if feature_fn is None and tuple(out.shape[1:]) != tuple(data.shape[1:]):
                raise ValueError(f"generator output [n, ...] must have data's trailing shape {tuple(data.shape[1:])}, "
                                 f"got {tuple(out.shape)}")
            f = _features(out, feature_fn, "feature_fn(samples)" if feature_fn is not None else "generator output")
            if f.shape[1] != xf.shape[2]:
                raise ValueError(f"sample features have size {f.shape[1]} but data features have {xf.shape[2]}")
            f = f.to(xf.dtype)
            check_finite("generator output", f)
            d, i, _, d0, i0 = nearest_eligible(xf, f[None], r, backend=backend)
            d, i = d[0], i[0]
            if best_z is None:
                best_z = torch.zeros((N, latent_dim), dtype=z.dtype, device=device)
            upd = d < best_d                     # strict: earlier chunks win ties
            best_d = torch.where(upd, d, best_d)
            best_z = torch.where(upd[:, None], z[i], best_z)
            if r > 0:
                d0, i0 = d0[0], i0[0]
                if fb_z is None:
                    fb_d, fb_z = d0, z[i0]
                else:
                    u0 = d0 < fb_d
                    fb_d = torch.where(u0, d0, fb_d)
                    fb_z = torch.where(u0[:, None], z[i0], fb_z)
        if r > 0:
            miss = torch.isinf(best_d)
            best_d = torch.where(miss, fb_d, best_d)
            best_z = torch.where(miss[:, None], fb_z, best_z)
    return best_z, best_d
