"""Adaptive IMLE (Aghabozorgi, Peng, Li, "Adaptive IMLE for Few-shot Pretraining-free Generative
Modelling", ICLR 2023): per-example targets instead of one re-selection schedule for all.

Plain IMLE replaces every example's latent every ``staleness`` epochs. Adaptive IMLE keeps, for
each example i, a threshold tau_i and an age (epochs since its latent was last selected). At a
check, with d_i the current distance from x_i to the sample g(z_i) of its latent:

* example i is *due* when d_i < tau_i (the generator has met its target for i) or when its age
  has reached ``max_age`` (the reference code's ``imle_force_resample``);
* for every due example, tau_i <- (1 - gamma) d_i, and its latent is replaced by the nearest
  candidate of a fresh pool (:func:`fastgen.imle.select_latents` on the due examples only);
  its age is reset to 0;
* examples that are not due keep their latent, so the generator keeps pulling the same sample
  towards them until it is close enough.

This follows the authors' reference training loop (``change_coef`` = gamma, ``imle_staleness`` =
the minimum age, ``imle_force_resample`` = the maximum age). Thresholds apply to the Euclidean
distance in feature space, stored squared: ``tau2_i = (1 - gamma)^2 d2_i``. At the first
selection (no current latent yet) tau_i is set from the distance of the selected sample. Checks
run every ``staleness`` epochs (so every example's age is a multiple of ``staleness`` and the
minimum age is ``staleness``); the pool is drawn and pushed through the generator only when
some example is due, with ``pool_factor * N`` candidates as in :class:`IMLESampler`, so each
due example picks among as many candidates as under plain IMLE.

``per_batch=True`` moves the check into the mini-batches (as ``IMLESampler(per_batch=True)``
does for plain IMLE): in a check epoch, each mini-batch checks its own examples and re-selects
the due ones from a fresh pool of ``pool_factor * batch`` candidates. Small fresh pools let
every region of the latent space be selected and pulled towards the data (needed on
well-separated modes such as grid-gmm, where a large shared pool leaves samples stranded
between modes).
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from .._validate import check_positive_int, check_tensor
from .select import _features, select_latents


class AdaptiveIMLESampler:
    """Holds one latent, one threshold and one age per data example; yields training batches.

    Same interface as :class:`fastgen.imle.IMLESampler`::

        sampler = AdaptiveIMLESampler(gen, data, latent_dim=32, gamma=0.02)
        for epoch in range(epochs):
            for z, idx in sampler.epoch(batch_size=128):
                loss = ((gen(z) - data[idx]) ** 2).flatten(1).sum(1).mean()
                opt.zero_grad(); loss.backward(); opt.step()

    Args:
        generator: callable z [n, latent_dim] -> samples [n, ...] (called under no_grad for the
            checks and the re-selections).
        data: [N, ...] float tensor (kept by reference).
        latent_dim: size of one latent.
        pool_factor: candidates per example: a re-selection draws ``pool_factor * N``
            candidates (default 10, Ke Li's reference), whatever the number of due examples.
        staleness: epochs between checks (the minimum age of a latent before it can be
            replaced; reference ``imle_staleness`` = 5).
        gamma: relative tightening of the threshold, 0 <= gamma < 1 (reference ``change_coef``,
            0.01 - 0.02 in the authors' scripts).
        max_age: an example whose latent is at least this many epochs old is re-selected
            whatever its distance (reference ``imle_force_resample``); default 3 * staleness.
        noise: std of the Gaussian perturbation added to each yielded latent (fresh noise per
            batch; stored latents do not drift). 0 disables.
        rejection_radius, feature_fn, latent_sampler, backend: as in
            :func:`fastgen.imle.select_latents`; the thresholds and the check distances use the
            same feature space (``feature_fn``, e.g. :class:`fastgen.imle.RandomProjection`).
        per_batch: checks and re-selections per mini-batch with pools of ``pool_factor * batch``
            candidates (see the module docstring); an example's age then grows when its batch
            is yielded.
        select_batch_size: chunk size of the re-selections and checks (memory bound).
        seed: seed of the sampler's own torch.Generator (pools, perturbations, shuffles).

    Attributes (per-example state, sized by the dataset, all in :meth:`state_dict`):
        ``latents`` [N, latent_dim]; ``dist2`` float32 [N]: squared feature distance from each
        example to the sample of its latent at the last check or selection; ``tau2`` float32
        [N]: squared thresholds; ``age`` int64 [N]: epochs since the latent was selected;
        ``epochs_seen``, ``selections`` (re-selection rounds that replaced at least one latent),
        ``history``: list of (epoch, number of latents replaced) for every check.

    Raises:
        TypeError / ValueError naming the argument for bad arguments (see the checks below).
    """

    def __init__(self, generator: Callable, data: torch.Tensor, *, latent_dim: int, pool_factor: float = 10,
                 staleness: int = 5, gamma: float = 0.02, max_age: int | None = None, noise: float = 0.01,
                 per_batch: bool = False, rejection_radius: float = 0.0, feature_fn: Callable | None = None,
                 latent_sampler: Callable | None = None, select_batch_size: int | None = None, seed: int = 0,
                 backend: str = "auto"):
        check_tensor("data", data)
        if data.dim() < 1:
            raise ValueError("data must be [N, ...]")
        if not callable(generator):
            raise TypeError(f"generator must be callable, got {type(generator).__name__}")
        if feature_fn is not None and not callable(feature_fn):
            raise TypeError(f"feature_fn must be callable, got {type(feature_fn).__name__}")
        self.generator = generator
        self.data = data
        self.latent_dim = check_positive_int("latent_dim", latent_dim)
        if isinstance(pool_factor, bool) or not isinstance(pool_factor, (int, float)) or not pool_factor > 0:
            raise ValueError(f"pool_factor must be a number > 0, got {pool_factor!r}")
        self.pool_factor = float(pool_factor)
        self.pool_size = max(1, int(round(pool_factor * data.shape[0])))
        self.staleness = check_positive_int("staleness", staleness)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 <= gamma < 1:
            raise ValueError(f"gamma must be a float in [0, 1), got {gamma!r}")
        self.gamma = float(gamma)
        self.max_age = 3 * self.staleness if max_age is None else check_positive_int("max_age", max_age)
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
            raise ValueError(f"noise must be a float >= 0, got {noise!r}")
        self.noise = float(noise)
        if not isinstance(per_batch, bool):
            raise TypeError(f"per_batch must be a bool, got {type(per_batch).__name__}")
        self.per_batch = per_batch
        self.rejection_radius = rejection_radius
        self.feature_fn = feature_fn
        self.latent_sampler = latent_sampler
        self.select_batch_size = (None if select_batch_size is None
                                  else check_positive_int("select_batch_size", select_batch_size))
        self.backend = backend
        self.rng = torch.Generator(device=data.device)
        self.rng.manual_seed(seed)
        N = data.shape[0]
        self.latents: torch.Tensor | None = None
        self.dist2 = torch.full((N,), float("inf"), dtype=torch.float32, device=data.device)
        self.tau2 = torch.full((N,), float("inf"), dtype=torch.float32, device=data.device)
        self.age = torch.zeros(N, dtype=torch.int64, device=data.device)
        self.epochs_seen = 0
        self.selections = 0
        self.history: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ pieces
    def _select(self, idx: torch.Tensor, pool_size: int | None = None):
        return select_latents(
            self.generator, self.data[idx], pool_size=pool_size or self.pool_size, latent_dim=self.latent_dim,
            batch_size=self.select_batch_size, rejection_radius=self.rejection_radius,
            feature_fn=self.feature_fn, latent_sampler=self.latent_sampler, rng=self.rng, backend=self.backend)

    @torch.no_grad()
    def current_dist2(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [N] (or [len(idx)] for the examples ``idx``): squared feature distance from
        each example to the sample of its stored latent (no perturbation) under the generator
        as it is now."""
        if self.latents is None:
            raise RuntimeError("no latents selected yet: call epoch() or reselect() first")
        lat, data = (self.latents, self.data) if idx is None else (self.latents[idx], self.data[idx])
        N = data.shape[0]
        bs = self.select_batch_size or 8192
        out = []
        for s in range(0, N, bs):
            f = _features(self.generator(lat[s:s + bs]), self.feature_fn, "generator output")
            x = _features(data[s:s + bs], self.feature_fn, "feature_fn(data)")
            if f.shape != x.shape:
                raise ValueError(f"sample features have shape {tuple(f.shape)} but data features {tuple(x.shape)}")
            out.append(((f.float() - x.float()) ** 2).sum(1))
        return torch.cat(out)

    def due(self, dist2: torch.Tensor) -> torch.Tensor:
        """bool [N]: the examples a check re-selects, given their current dist2 [N]."""
        return (dist2 < self.tau2) | (self.age >= self.max_age)

    def reselect(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Select new latents for the examples ``idx`` (int64 [n]; default: all) from a fresh
        pool now, without touching thresholds (except at the very first selection, where tau2
        is set from the selected distances) and resetting their age; returns their dist2 [n]."""
        N = self.data.shape[0]
        first = self.latents is None
        if idx is None or first:
            idx = torch.arange(N, device=self.data.device)
        z, d = self._select(idx)
        if first:
            self.latents = torch.zeros((N, self.latent_dim), dtype=z.dtype, device=self.data.device)
            self.tau2 = d * (1.0 - self.gamma) ** 2
        self.latents[idx] = z.to(self.latents.dtype)
        self.dist2[idx] = d
        self.age[idx] = 0
        self.selections += 1
        return d

    def check(self) -> int:
        """One Adaptive IMLE check: finds the due examples, tightens their thresholds to
        (1 - gamma) times their current distance and re-selects their latents. Returns the
        number of latents replaced."""
        if self.latents is None:
            self.reselect()
            self.history.append((self.epochs_seen, self.data.shape[0]))
            return self.data.shape[0]
        d = self.current_dist2()
        self.dist2 = d
        due = self.due(d)
        idx = due.nonzero().squeeze(1)
        n = int(idx.numel())
        if n:
            self.tau2[idx] = d[idx] * (1.0 - self.gamma) ** 2
            self.reselect(idx)
        self.history.append((self.epochs_seen, n))
        return n

    # ------------------------------------------------------------------ loop interface
    def _check_batch(self, idx: torch.Tensor, first: bool) -> int:
        """per_batch: check the examples idx and re-select the due ones from a fresh pool of
        pool_factor * len(idx) candidates; returns the number replaced."""
        pool = max(1, int(round(self.pool_factor * len(idx))))
        if first:
            due = idx
        else:
            d = self.current_dist2(idx)
            self.dist2[idx] = d
            m = (d < self.tau2[idx]) | (self.age[idx] >= self.max_age)
            due = idx[m]
            self.tau2[due] = d[m] * (1.0 - self.gamma) ** 2
        if due.numel():
            z, dn = self._select(due, pool)
            self.latents[due] = z.to(self.latents.dtype)
            self.dist2[due] = dn
            self.age[due] = 0
            if first:
                self.tau2[due] = dn * (1.0 - self.gamma) ** 2
        return int(due.numel())

    def epoch(self, batch_size: int, *, shuffle: bool = True, drop_last: bool = False
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass over the data: yields (latents [b, latent_dim], indices [b] int64). Runs a
        check first when ``staleness`` epochs have passed since the last one (per mini-batch
        with ``per_batch``); then every age grows by one (the age counts the epochs a latent
        has been trained for)."""
        check_positive_int("batch_size", batch_size)
        N = self.data.shape[0]
        dev = self.data.device
        first = self.latents is None
        check_now = first or self.epochs_seen % self.staleness == 0
        if self.per_batch:
            if first:
                self.latents = torch.zeros((N, self.latent_dim), device=dev)
            replaced = 0
        elif check_now:
            self.check()
        epoch_no = self.epochs_seen
        self.epochs_seen += 1
        if not self.per_batch:
            self.age += 1
        order = torch.randperm(N, generator=self.rng, device=dev) if shuffle else torch.arange(N, device=dev)
        stop = N - N % batch_size if drop_last else N
        for s in range(0, stop, batch_size):
            idx = order[s:s + batch_size]
            if self.per_batch:
                if check_now:
                    replaced += self._check_batch(idx, first)
                self.age[idx] += 1
            z = self.latents[idx]
            if self.noise > 0:
                z = z + self.noise * torch.randn(z.shape, generator=self.rng, device=dev, dtype=z.dtype)
            yield z, idx
        if self.per_batch and check_now:
            self.selections += 1
            self.history.append((epoch_no, replaced))

    def state_dict(self) -> dict:
        """Copies of the per-example state (latents, dist2, tau2, age), counters, history and
        the rng state."""
        c = (lambda t: None if t is None else t.clone())
        return {"latents": c(self.latents), "dist2": c(self.dist2), "tau2": c(self.tau2), "age": c(self.age),
                "epochs_seen": self.epochs_seen, "selections": self.selections,
                "history": list(self.history), "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        N = self.data.shape[0]
        for k in ("dist2", "tau2", "age"):
            v = state[k]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != (N,):
                raise ValueError(f"state[{k!r}] must be a tensor of shape ({N},) for this dataset, "
                                 f"got {getattr(v, 'shape', type(v).__name__)}")
        lat = state["latents"]
        if lat is not None and (not isinstance(lat, torch.Tensor) or tuple(lat.shape) != (N, self.latent_dim)):
            raise ValueError(f"state['latents'] must have shape ({N}, {self.latent_dim}), "
                             f"got {getattr(lat, 'shape', type(lat).__name__)}")
        dev = self.data.device
        self.latents = None if lat is None else lat.to(dev).clone()
        self.dist2 = state["dist2"].to(dev, torch.float32).clone()
        self.tau2 = state["tau2"].to(dev, torch.float32).clone()
        self.age = state["age"].to(dev, torch.int64).clone()
        self.epochs_seen = int(state["epochs_seen"])
        self.selections = int(state["selections"])
        self.history = [tuple(h) for h in state.get("history", [])]
        self.rng.set_state(state["rng"])
