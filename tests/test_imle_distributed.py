"""IMLE under torch.distributed: IMLESampler's data-parallel mode (fastgen/imle/distributed.py).

The DDP test trains a tiny MLP generator wrapped in DistributedDataParallel with 2 processes on
the gloo backend (CPU, spawned, one thread each) and replays the same run in this process. What
must match, and why:

* Selection: rank r owns the examples r, r + 2, ...; its pools are drawn from its own seed
  (rank_seed(seed, r)). The single-process replay runs one IMLESampler(rank=r, world_size=2)
  per shard (no process group: the same per-shard pools) against the same generator. Every
  selection of every rank (latents, dist2) equals the replay's for that shard, and the union of
  the ranks' selections (gather_shards) equals the replay's selections scattered by index.
* Batches: each rank yields the same (latents, global indices) as the replay's sampler for its
  shard, the same number of batches of the same sizes on both ranks (shard sizes 11 and 10 of
  N = 21: the shorter one is padded), indices inside the rank's shard.
* Gradient steps: DDP averages the ranks' gradients of their mean losses over local batches of
  equal size, which is the gradient of the mean loss over the concatenated global batch; the
  replay takes one SGD step on that concatenation. Parameters match to fp32 rounding after every
  epoch (all-reduce summation order differs).

Both the pooled mode (re-selection every 2 epochs, perturbation 0.01) and the per-batch-pool
mode are checked.
"""
import os

import pytest
import torch

from fastgen.imle import IMLESampler
from fastgen.imle.distributed import examples_per_rank, gather_shards, rank_seed, resolve_rank, shard_indices

N, D, L, BS, EPOCHS, WORLD = 21, 5, 3, 4, 4, 2
MODES = {"pooled": dict(pool_factor=3, staleness=2, noise=0.01, seed=7),
         "per_batch": dict(pool_factor=2, per_batch=True, noise=0.0, seed=11)}


def _data():
    return torch.randn(N, D, generator=torch.Generator().manual_seed(123)) * 0.5 + 2.0


def _make_gen():
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Linear(L, 16), torch.nn.ReLU(), torch.nn.Linear(16, D))


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _worker(rank, world, rdv, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world)
    try:
        data = _data()
        result = {}
        for mode, kw in MODES.items():
            gen = _make_gen()
            model = DDP(gen)
            sampler = IMLESampler(gen, data, latent_dim=L, distributed=True, **kw)
            opt = torch.optim.SGD(model.parameters(), lr=0.05)
            batches, selections, params = [], [], []
            for _ in range(EPOCHS):
                for z, idx in sampler.epoch(BS):
                    loss = ((model(z) - data[idx]) ** 2).sum(1).mean()
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    batches.append((z.clone(), idx.clone()))
                selections.append((sampler.latents.clone(), sampler.dist2.clone()))
                params.append(_params(gen))
            full = (gather_shards(sampler.latents, sampler.indices, N), gather_shards(sampler.dist2, sampler.indices, N))
            result[mode] = dict(batches=batches, selections=selections, params=params, full=full,
                                indices=sampler.indices.clone(), rank=sampler.rank, world=sampler.world_size,
                                state=sampler.state_dict())
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _replay(mode):
    """The same run in one process: one sampler per shard, one SGD step per pair of batches on
    their concatenation."""
    data = _data()
    gen = _make_gen()
    samplers = [IMLESampler(gen, data, latent_dim=L, rank=r, world_size=WORLD, **MODES[mode]) for r in range(WORLD)]
    opt = torch.optim.SGD(gen.parameters(), lr=0.05)
    batches = [[] for _ in range(WORLD)]
    selections = [[] for _ in range(WORLD)]
    params = []
    for _ in range(EPOCHS):
        for pairs in zip(*(s.epoch(BS) for s in samplers)):
            z = torch.cat([p[0] for p in pairs])
            idx = torch.cat([p[1] for p in pairs])
            loss = ((gen(z) - data[idx]) ** 2).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            for r, p in enumerate(pairs):
                batches[r].append((p[0].clone(), p[1].clone()))
        for r, s in enumerate(samplers):
            selections[r].append((s.latents.clone(), s.dist2.clone()))
        params.append(_params(gen))
    return batches, selections, params, samplers


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    import torch.multiprocessing as mp

    d = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, str(d / "rendezvous"), str(d)), nprocs=WORLD, join=True, start_method="spawn")
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("mode", list(MODES))
def test_ddp_matches_single_process_replay(ddp_run, mode):
    batches, selections, params, samplers = _replay(mode)
    runs = [ddp_run[r][mode] for r in range(WORLD)]
    shards = [shard_indices(N, r, WORLD) for r in range(WORLD)]
    for r, run in enumerate(runs):
        assert (run["rank"], run["world"]) == (r, WORLD)
        assert torch.equal(run["indices"], shards[r])
        # per-example state lives on the owning rank only
        assert run["selections"][-1][0].shape == (len(shards[r]), L)
        assert run["state"]["latents"].shape[0] == len(shards[r])
        # same batches (global indices within the shard, latents bit-equal) as the replay
        assert len(run["batches"]) == len(batches[r]) == EPOCHS * -(-examples_per_rank(N, WORLD) // BS)
        for (z, idx), (zr, idxr) in zip(run["batches"], batches[r]):
            assert torch.equal(idx, idxr)
            assert bool(torch.isin(idx, shards[r]).all())
            assert torch.equal(z, zr)
        # every selection equals the replay's for this shard
        for (lat, d2), (latr, d2r) in zip(run["selections"], selections[r]):
            assert torch.equal(lat, latr)
            torch.testing.assert_close(d2, d2r, rtol=1e-5, atol=1e-6)
    # equal batch sizes on every rank at every step (DDP all-reduce pairs the steps)
    for step in zip(*(run["batches"] for run in runs)):
        assert len({len(b[1]) for b in step}) == 1
    # the union of the ranks' selections is the replay's selection, scattered by global index
    want_lat = torch.empty(N, L)
    want_d2 = torch.empty(N)
    for r in range(WORLD):
        want_lat[shards[r]] = samplers[r].latents
        want_d2[shards[r]] = samplers[r].dist2
    for run in runs:                       # every rank got the same gathered result
        assert torch.equal(run["full"][0], want_lat)
        torch.testing.assert_close(run["full"][1], want_d2, rtol=1e-5, atol=1e-6)
    # DDP step == single-process step on the concatenated batch, epoch after epoch
    for r in range(WORLD):
        for got, want in zip(runs[r]["params"], params):
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the replicas stayed identical
    for a, b in zip(runs[0]["params"][-1], runs[1]["params"][-1]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------- no process group
def test_shards_partition_and_padding():
    parts = [shard_indices(N, r, 4) for r in range(4)]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(N))
    assert [len(p) for p in parts] == [6, 5, 5, 5] and examples_per_rank(N, 4) == 6
    data = _data()
    s = IMLESampler(lambda z: z.repeat(1, 2)[:, :D], data, latent_dim=L, rank=3, world_size=4, seed=1)
    got = [idx for _, idx in s.epoch(4)]
    idx = torch.cat(got)
    assert [len(i) for i in got] == [4, 2]
    assert len(idx) == 6 and set(idx.tolist()) == set(parts[3].tolist())    # one example repeated
    assert torch.equal(s.to_local(parts[3]), torch.arange(5))
    with pytest.raises(ValueError, match="idx"):
        s.to_local(torch.tensor([0]))
    assert s.latents.shape == (5, L) and s.pool_size == 10 * 5      # pool_factor x the shard
    assert [len(i) for _, i in s.epoch(4, drop_last=True)] == [4]     # 6 per rank, batch 4


def test_world_size_one_is_the_single_process_sampler():
    data = _data()
    gen = _make_gen()
    a = IMLESampler(gen, data, latent_dim=L, seed=3)
    b = IMLESampler(gen, data, latent_dim=L, seed=3, rank=0, world_size=1)
    for (za, ia), (zb, ib) in zip(a.epoch(5), b.epoch(5)):
        assert torch.equal(za, zb) and torch.equal(ia, ib)
    assert torch.equal(a.latents, b.latents) and torch.equal(b.indices, torch.arange(N))
    assert rank_seed(3, 0) == 3 and rank_seed(3, 1) != rank_seed(3, 0) and rank_seed(3, 1) != rank_seed(4, 0)


def test_state_dict_round_trip_and_rank_check():
    data = _data()
    gen = _make_gen()
    s = IMLESampler(gen, data, latent_dim=L, rank=1, world_size=2, seed=2)
    list(s.epoch(4))
    st = s.state_dict()
    t = IMLESampler(gen, data, latent_dim=L, rank=1, world_size=2, seed=99)
    t.load_state_dict(st)
    for (za, ia), (zb, ib) in zip(s.epoch(4), t.epoch(4)):
        assert torch.equal(za, zb) and torch.equal(ia, ib)
    with pytest.raises(ValueError, match="rank"):
        IMLESampler(gen, data, latent_dim=L, rank=0, world_size=2).load_state_dict(st)


def test_gather_shards_without_process_group():
    v = torch.randn(N, 3)
    perm = torch.randperm(N)
    assert torch.equal(gather_shards(v[perm], perm, N), v)
    with pytest.raises(ValueError, match="exactly once"):
        gather_shards(v[:N - 1], torch.arange(N - 1), N)
    with pytest.raises(ValueError, match="same length"):
        gather_shards(v, torch.arange(N - 1), N)


def test_bad_arguments_name_the_argument():
    data = _data()
    gen = _make_gen()
    with pytest.raises(ValueError, match="process group"):
        IMLESampler(gen, data, latent_dim=L, distributed=True)
    with pytest.raises(ValueError, match="rank"):
        IMLESampler(gen, data, latent_dim=L, rank=2, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        IMLESampler(gen, data, latent_dim=L, rank=0)
    with pytest.raises(ValueError, match="world_size"):
        IMLESampler(gen, data, latent_dim=L, rank=0, world_size=0)
    with pytest.raises(TypeError, match="rank"):
        resolve_rank(False, 0.5, 2)
    with pytest.raises(TypeError, match="distributed"):
        resolve_rank("yes")
    with pytest.raises(ValueError, match="at least world_size"):
        IMLESampler(gen, data[:3], latent_dim=L, rank=0, world_size=4)
