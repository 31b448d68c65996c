"""IMLESampler: the latent bookkeeping of an IMLE training loop (Li & Malik 2018), so that a
user's loop only sees (latents, data indices) batches.

Ke Li's reference defaults: a pool of 10 x the data, re-selection every 5 epochs
(staleness), and a small Gaussian perturbation (std 0.01) of the selected latents between
re-selections.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from .._validate import check_positive_int, check_tensor
from .distributed import examples_per_rank, rank_seed, resolve_rank, shard_indices
from .select import select_latents


class IMLESampler:
    """Holds one selected latent per data example and yields training batches.

    Usage::

        sampler = IMLESampler(gen, data, latent_dim=32)
        for epoch in range(epochs):
            for z, idx in sampler.epoch(batch_size=128):
                loss = ((gen(z) - data[idx]) ** 2).flatten(1).sum(1).mean()
                opt.zero_grad(); loss.backward(); opt.step()

    Args:
        generator: callable z [n, latent_dim] -> samples [n, ...].
        data: [N, ...] float tensor (the examples; kept by reference).
        latent_dim: size of one latent.
        pool_factor: candidates per example at each re-selection (pool = pool_factor * N).
        staleness: re-select every ``staleness`` epochs (the first call to :meth:`epoch`
            always selects).
        per_batch: instead of a dataset-wide pool, draw a fresh pool of
            ``pool_factor * batch`` candidates for every mini-batch and select among them
            (Li & Malik 2018, Algorithm 1 with fresh samples per batch); ``staleness`` is then
            unused. Every region of the latent space is eventually selected and pulled
            towards the data, which a large shared pool never does (samples already near the
            data win every pick): needed on well-separated modes such as grid-gmm.
        noise: std of the Gaussian perturbation added to each yielded latent between
            re-selections (fresh noise per batch; the stored latents do not drift). 0 disables.
        rejection_radius, feature_fn, latent_sampler, backend: passed to
            :func:`fastgen.imle.select_latents`.
        select_batch_size: chunk size of the re-selection (memory bound).
        seed: seed of the sampler's own torch.Generator (pools, perturbations, shuffles); rank r
            uses :func:`fastgen.imle.distributed.rank_seed` (seed, r) (= seed on rank 0).
        distributed: data-parallel mode under ``torch.distributed`` (DDP): rank and world size
            from the initialised default process group (see :mod:`fastgen.imle.distributed`).
        rank, world_size: the same mode with an explicit rank (no process group needed: emulates
            one rank of a run, e.g. to reproduce it in one process); give both or neither.

    Data-parallel mode (world_size W > 1): ``data`` is the full dataset [N, ...] on every rank;
    this rank owns the examples ``indices`` = rank, rank + W, ... and keeps the per-example state
    (``latents``, ``dist2``) for those only, in that order; its pools hold pool_factor x its shard
    and are drawn from its own seed; :meth:`epoch` yields ceil(N / W) examples on every rank
    (a shorter shard repeats one example, as DistributedSampler pads) as *global* indices into
    ``data``. Nothing is gathered; wrap the generator in DistributedDataParallel for the steps
    and pass the unwrapped module here (the selection is a no_grad forward on the local replica;
    DDP's forward may broadcast buffers, a collective that ranks with different pool sizes would
    not pair). A user ``latent_sampler`` must draw rank-dependent candidates itself::

        dist.init_process_group("nccl")            # or "gloo" on CPU
        gen = MyGenerator().to(device); model = DistributedDataParallel(gen)
        sampler = IMLESampler(gen, data, latent_dim=32, distributed=True)
        for epoch in range(epochs):
            for z, idx in sampler.epoch(batch_size=128):       # idx: global, this rank's shard
                loss = ((model(z) - data[idx]) ** 2).flatten(1).sum(1).mean()
                opt.zero_grad(); loss.backward(); opt.step()

    Attributes after a selection: ``latents`` [n, latent_dim], ``dist2`` [n] (squared distance
    from each example to its sample at selection time), for the n = N examples (or the n owned
    ones, in the order of ``indices``), ``indices`` int64 [n] (global), ``rank``, ``world_size``,
    ``epochs_seen``, ``selections``.
    """

    def __init__(self, generator: Callable, data: torch.Tensor, *, latent_dim: int, pool_factor: float = 10,
                 staleness: int = 5, noise: float = 0.01, per_batch: bool = False, rejection_radius: float = 0.0,
                 feature_fn: Callable | None = None, latent_sampler: Callable | None = None,
                 select_batch_size: int | None = None, seed: int = 0, backend: str = "auto",
                 distributed: bool = False, rank: int | None = None, world_size: int | None = None):
        check_tensor("data", data)
        if data.dim() < 1:
            raise ValueError("data must be [N, ...]")
        self.generator = generator
        self.data = data
        self.rank, self.world_size = resolve_rank(distributed, rank, world_size)
        self.indices = shard_indices(data.shape[0], self.rank, self.world_size, device=data.device)
        # this rank's examples (the full tensor itself in a single process: no copy)
        self._local = data if self.world_size == 1 else data[self.indices]
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        if isinstance(pool_factor, bool) or not isinstance(pool_factor, (int, float)) or pool_factor <= 0:
            raise ValueError(f"pool_factor must be a number > 0, got {pool_factor!r}")
        self.pool_size = max(1, int(round(pool_factor * self._local.shape[0])))
        self.staleness = check_positive_int("staleness", staleness)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or noise < 0:
            raise ValueError(f"noise must be a float >= 0, got {noise!r}")
        self.noise = float(noise)
        if not isinstance(per_batch, bool):
            raise TypeError(f"per_batch must be a bool, got {type(per_batch).__name__}")
        self.per_batch = per_batch
        self.pool_factor = float(pool_factor)
        self.rejection_radius = rejection_radius
        self.feature_fn = feature_fn
        self.latent_sampler = latent_sampler
        self.select_batch_size = select_batch_size
        self.backend = backend
        self.rng = torch.Generator(device=data.device)
        self.rng.manual_seed(rank_seed(seed, self.rank))
        self.latents: torch.Tensor | None = None
        self.dist2: torch.Tensor | None = None
        self.epochs_seen = 0
        self.selections = 0

    def _select(self, data, pool_size):
        return select_latents(
            self.generator, data, pool_size=pool_size, latent_dim=self.latent_dim,
            batch_size=self.select_batch_size, rejection_radius=self.rejection_radius,
            feature_fn=self.feature_fn, latent_sampler=self.latent_sampler, rng=self.rng, backend=self.backend)

    def to_local(self, idx: torch.Tensor) -> torch.Tensor:
        """Positions in ``latents`` / ``dist2`` / ``indices`` of global indices owned by this rank
        ((idx - rank) // world_size); ValueError for an index this rank does not own."""
        idx = torch.as_tensor(idx, device=self.indices.device)
        if self.world_size == 1:
            return idx
        if bool(((idx - self.rank) % self.world_size != 0).any()) or bool((idx < 0).any()) or \
                bool((idx >= self.data.shape[0]).any()):
            raise ValueError(f"idx holds indices not owned by rank {self.rank} of {self.world_size}")
        return (idx - self.rank) // self.world_size

    def reselect(self) -> torch.Tensor:
        """Run :func:`select_latents` over a fresh pool for this process's examples (the whole
        dataset, or this rank's shard) now; returns dist2 [n]."""
        self.latents, self.dist2 = self._select(self._local, self.pool_size)
        self.selections += 1
        return self.dist2

    def epoch(self, batch_size: int, *, shuffle: bool = True, drop_last: bool = False
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the data: yields (latents [b, latent_dim], indices [b] int64, global
        indices into ``data``). Re-selects first when the staleness period has elapsed.
        In data-parallel mode every rank yields ceil(N / W) examples in batches of the same sizes."""
        check_positive_int("batch_size", batch_size)
        if not isinstance(shuffle, bool) or not isinstance(drop_last, bool):
            raise TypeError("shuffle and drop_last must be bools")
        if not self.per_batch and (self.latents is None or self.epochs_seen % self.staleness == 0):
            self.reselect()
        self.epochs_seen += 1
        n = self._local.shape[0]
        dev = self.data.device
        order = torch.randperm(n, generator=self.rng, device=dev) if shuffle else torch.arange(n, device=dev)
        total = examples_per_rank(self.data.shape[0], self.world_size)
        if total > n:            # a shorter shard: pad like DistributedSampler (repeat from the start)
            order = torch.cat([order, order[:total - n]])
        stop = total - total % batch_size if drop_last else total
        if self.per_batch and self.latents is None:
            self.latents = torch.zeros(n, self.latent_dim, device=dev)
            self.dist2 = torch.full((n,), float("inf"), device=dev)
        for s in range(0, stop, batch_size):
            loc = order[s:s + batch_size]
            if self.per_batch:
                z, d = self._select(self._local[loc], max(1, int(round(self.pool_factor * len(loc)))))
                self.latents[loc] = z.to(self.latents.dtype)
                self.dist2[loc] = d
                self.selections += 1
            else:
                z = self.latents[loc]
            if self.noise > 0:
                z = z + self.noise * torch.randn(z.shape, generator=self.rng, device=dev, dtype=z.dtype)
            yield z, (loc if self.world_size == 1 else self.indices[loc])

    def state_dict(self) -> dict:
        """This process's state (in data-parallel mode: this rank's shard only; each rank saves
        its own, or see :func:`fastgen.imle.distributed.gather_shards`)."""
        def copy(t):  # a snapshot: per-batch selection writes into self.latents in place
            return None if t is None else t.clone()

        return {"latents": copy(self.latents), "dist2": copy(self.dist2), "epochs_seen": self.epochs_seen,
                "selections": self.selections, "rng": self.rng.get_state(), "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; ValueError when it was saved by another rank / world size."""
        saved = (int(state.get("rank", 0)), int(state.get("world_size", 1)))
        if saved != (self.rank, self.world_size):
            raise ValueError(f"state was saved by rank {saved[0]} of {saved[1]}, this sampler is rank "
                             f"{self.rank} of {self.world_size}")
        self.latents = None if state["latents"] is None else state["latents"].clone()
        self.dist2 = None if state["dist2"] is None else state["dist2"].clone()
        self.epochs_seen = int(state["epochs_seen"])
        self.selections = int(state["selections"])
        self.rng.set_state(state["rng"])
