"""IMLE under ``torch.distributed`` / DistributedDataParallel: sharding rules shared by
:class:`fastgen.imle.IMLESampler` (``distributed=True`` or ``rank=`` / ``world_size=``).

The scheme (data parallel, nothing gathered that does not need to be):

* Ownership: rank r of W owns the global example indices ``r, r + W, r + 2W, ...``
  (:func:`shard_indices`, the strided split of ``torch.utils.data.DistributedSampler`` with
  ``shuffle=False``), for the whole run. The per-example state of IMLE (the selected latent, its
  squared distance, any Adaptive-IMLE threshold) lives only on the owning rank.
* Pools: each rank draws its own candidate pool (``pool_factor`` x its shard) from its own
  generator seeded with :func:`rank_seed` (``seed`` on rank 0, so one process reproduces the
  single-process sampler exactly), and runs the selection for its shard only. Every rank holds a
  replica of the generator (DDP keeps them equal), so no samples or latents cross ranks.
* Epochs: every rank yields the same number of batches of the same sizes,
  :func:`examples_per_rank` = ceil(N / W) examples per epoch; a rank whose shard is one shorter
  repeats the first example of its shuffled order (DistributedSampler's padding), so DDP's
  gradient all-reduce sees matching steps on every rank. Indices yielded are global.
* Gradients: with equal local batch sizes, DDP's average of the per-rank mean losses is the mean
  loss over the concatenated global batch, so a DDP step equals a single-process step on the
  concatenation of the ranks' batches (what tests/test_imle_distributed.py checks).

:func:`gather_shards` assembles a full [N, ...] tensor from every rank's shard (checkpoints,
diagnostics); training never calls it.
"""
from __future__ import annotations

import torch

__all__ = ["resolve_rank", "shard_indices", "rank_seed", "examples_per_rank", "gather_shards"]

_SEED_STRIDE = 1_000_003   # rank r's pool / shuffle generator: seed + r * stride (a prime)


def _check_int(name, v, minimum):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def resolve_rank(distributed: bool = False, rank: int | None = None, world_size: int | None = None,
                 group=None) -> tuple[int, int]:
    """(rank, world_size) of the caller.

    ``distributed=True``: from ``torch.distributed`` (``group`` or the default group), which must
    be initialised; ``rank`` / ``world_size`` must then be None. Otherwise ``rank`` and
    ``world_size`` given together (emulating a rank without a process group, e.g. in tests), or
    neither (a single process: (0, 1)).

    Raises:
        ValueError: distributed=True without an initialised process group or together with an
            explicit rank / world_size; only one of rank / world_size given; rank outside
            [0, world_size). TypeError: non-int rank / world_size, non-bool distributed.
    """
    if not isinstance(distributed, bool):
        raise TypeError(f"distributed must be a bool, got {type(distributed).__name__}")
    if distributed:
        if rank is not None or world_size is not None:
            raise ValueError("distributed=True takes rank and world_size from torch.distributed: "
                             "pass rank / world_size only without distributed=True")
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed process group "
                             "(call torch.distributed.init_process_group first)")
        return dist.get_rank(group), dist.get_world_size(group)
    if rank is None and world_size is None:
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError(f"rank and world_size must be given together, got rank={rank!r}, world_size={world_size!r}")
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size = {world_size}), got {rank}")
    return rank, world_size


def shard_indices(n: int, rank: int, world_size: int, device=None) -> torch.Tensor:
    """Global indices owned by ``rank``: int64 [ceil((n - rank) / world_size)] =
    ``rank, rank + world_size, ...`` (< n). Raises ValueError when a rank would own nothing
    (n < world_size)."""
    _check_int("n", n, 1)
    rank, world_size = resolve_rank(False, rank, world_size)
    if n < world_size:
        raise ValueError(f"data must have at least world_size = {world_size} examples (one per rank), got {n}")
    return torch.arange(rank, n, world_size, device=device)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank ``rank``'s pool / shuffle generator: ``seed + 1000003 * rank`` (rank 0 keeps
    ``seed``; distinct ranks get distinct streams)."""
    return int(seed) + _SEED_STRIDE * int(rank)


def examples_per_rank(n: int, world_size: int) -> int:
    """Examples every rank yields per epoch: ceil(n / world_size) (shorter shards are padded)."""
    return -(-n // world_size)


def gather_shards(local: torch.Tensor, indices: torch.Tensor, n: int, *, group=None) -> torch.Tensor:
    """Assemble the full [n, ...] tensor from every rank's rows ``local`` [n_r, ...] held for the
    global ``indices`` [n_r] (a collective: every rank must call it; every rank gets the result).
    Without an initialised process group, ``local`` must cover all n rows and is scattered into
    place. For checkpoints and diagnostics only: IMLE training never gathers.

    Raises:
        ValueError: mismatched lengths, indices out of range, rows not covered exactly once.
    """
    if not isinstance(local, torch.Tensor) or not isinstance(indices, torch.Tensor):
        raise TypeError("local and indices must be torch.Tensors")
    if indices.dim() != 1 or local.dim() < 1 or local.shape[0] != indices.shape[0]:
        raise ValueError(f"local [n_r, ...] and indices [n_r] must have the same length, got shapes "
                         f"{tuple(local.shape)} and {tuple(indices.shape)}")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        W = dist.get_world_size(group)
        m = examples_per_rank(n, W)
        if local.shape[0] > m:
            raise ValueError(f"a rank holds at most ceil(n / world_size) = {m} rows, got {local.shape[0]}")
        pad_v = local.new_zeros((m,) + tuple(local.shape[1:]))
        pad_v[:local.shape[0]] = local
        pad_i = torch.full((m,), -1, dtype=torch.int64, device=local.device)
        pad_i[:indices.shape[0]] = indices
        vs = [torch.empty_like(pad_v) for _ in range(W)]
        ids = [torch.empty_like(pad_i) for _ in range(W)]
        dist.all_gather(vs, pad_v, group=group)
        dist.all_gather(ids, pad_i, group=group)
        v, i = torch.cat(vs), torch.cat(ids)
        keep = i >= 0
        v, i = v[keep], i[keep]
    else:
        v, i = local, indices
    if i.numel() != n or (i.numel() and (int(i.min()) < 0 or int(i.max()) >= n)) or \
            torch.bincount(i, minlength=n).ne(1).any():
        raise ValueError(f"the ranks' indices must cover 0..{n - 1} exactly once")
    out = v.new_empty((n,) + tuple(v.shape[1:]))
    out[i] = v
    return out
