"""Triton kNN backend (fastgen/ops/knn_triton.py) against the float64 brute force.

On CPU these run in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), with
tiny shapes; the `gpu` tests run the autotuned kernels on large shapes when CUDA is present.
Exactness means: the same indices as fastgen.reference.knn (ties -> lowest index) and dist2
equal to the float64 distance rounded to float32 (within one float32 ulp).
"""
import pytest
import torch

pytest.importorskip("triton")

from fastgen import _dispatch  # noqa: E402
from fastgen.ops import knn_triton as kt  # noqa: E402
from fastgen.reference.knn import knn as ref_knn  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def clustered(n, d, *, n_clusters=4, std=1e-2, offset=1e3, centres=None, gen=None):
    if centres is None:
        centres = torch.randn(n_clusters, d, generator=gen)
    lab = torch.randint(0, centres.shape[0], (n,), generator=gen)
    return centres[lab] + std * torch.randn(n, d, generator=gen) + offset, centres


def check_exact(q, k, kk, **kw):
    d, i, tiers = kt.knn_triton(q, k, kk, _tiers=True, **kw)
    rd, ri = ref_knn(q, k, kk)
    assert d.dtype == torch.float32 and i.dtype == torch.int64
    assert d.shape == rd.shape and i.shape == ri.shape
    wrong = (i.cpu() != ri.cpu()).any(-1)
    assert int(wrong.sum()) == 0, f"{int(wrong.sum())} queries with wrong neighbours"
    torch.testing.assert_close(d.cpu().double(), rd.cpu(), rtol=1.2e-7, atol=1e-30)
    assert bool((d[..., 1:] >= d[..., :-1]).all())
    return tiers


@pytest.mark.parametrize("k", [1, 3, 16])
def test_random(k):
    q, key = torch.randn(45, 24, device=DEV), torch.randn(301, 24, device=DEV)
    tiers = check_exact(q, key, k)
    assert tiers.shape == (45,)


def test_clustered_offset_local_tier():
    # std 1e-2 clusters 1e3 from the origin: no bound in global coordinates can certify them
    # (tier 1); tier 2 re-centres each group of queries and must certify nearly all, exactly
    g = torch.Generator().manual_seed(1)
    key, c = clustered(300, 32, n_clusters=3, gen=g)
    q, _ = clustered(256, 32, centres=c, gen=g)
    tiers = check_exact(q.to(DEV), key.to(DEV), 2)
    assert int((tiers == 2).sum()) >= 200


def test_clustered_offset_direct_tier():
    # the same data without tier 2: tier 3 (fp32 direct differences) certifies them
    g = torch.Generator().manual_seed(1)
    key, c = clustered(300, 32, gen=g)
    q, _ = clustered(40, 32, centres=c, gen=g)
    tiers = check_exact(q.to(DEV), key.to(DEV), 4, _local=False)
    assert int((tiers == 3).sum()) > 0


def test_clustered_offset_k1_bf16_candidates():
    g = torch.Generator().manual_seed(2)
    key, c = clustered(300, 16, gen=g)
    q, _ = clustered(48, 16, centres=c, gen=g)
    check_exact(q.to(DEV), key.to(DEV), 1, _precision="bf16")


def test_ties_and_duplicates():
    # integer grid points: many exactly equal distances; duplicated keys
    g = torch.Generator().manual_seed(3)
    key = torch.randint(0, 3, (250, 4), generator=g).float()
    key = torch.cat([key, key[:50]])  # exact duplicates with higher indices
    q = torch.randint(0, 3, (40, 4), generator=g).float()
    tiers = check_exact(q.to(DEV), key.to(DEV), 5)
    assert int((tiers == 4).sum()) > 0  # ties beyond C - k + 1 keys need the exact scan


def test_near_tie_below_fp32_resolution():
    # key 6 = (1 - 2^-24, y) is at squared distance 1 - 6e-16 from the origin, but fp32
    # computes exactly 1.0 for it, the same as the six copies of (1, 0) with lower indices:
    # the fp32 direct-difference tier cannot separate them and must hand over to tier 4
    x, y = 0.9999999403953552, 0.0003452669770922512
    far = torch.rand(50, 2) + torch.tensor([3.0, 0.0])
    key = torch.cat([torch.tensor([[1.0, 0.0]] * 6), torch.tensor([[x, y]]), far]).to(DEV)
    q = torch.cat([torch.zeros(1, 2), torch.rand(5, 2) * 4]).to(DEV)
    tiers = check_exact(q, key, 1)  # C = 4 < 7 keys at fp32 distance 1.0
    assert int(tiers[0]) == 4
    d, i = kt.knn_triton(q[:1], key, 2)  # C = 8: all seven are candidates of tier 1
    assert i[0].tolist() == [6, 0]


def test_query_equals_key_duplicates():
    base = torch.randn(20, 9)
    key = base[torch.randint(0, 20, (200,))] * 50 + 7
    check_exact(key[:30].to(DEV), key.to(DEV), 4)


@pytest.mark.parametrize("d", [1, 7, 130])
def test_odd_dimensions(d):
    # d = 1: dense 1-D data (tiny neighbour gaps); d = 130 pads to 192 and runs the D loop
    q, key = torch.randn(33, d, device=DEV) + 5, torch.randn(157, d, device=DEV) + 5
    check_exact(q, key, 3)


def test_batched():
    q = torch.randn(3, 37, 17, device=DEV) * 5 + 100
    key = torch.randn(3, 150, 17, device=DEV) * 5 + 100
    key[1] = key[1] * 1e-3  # each batch has its own mean and scale
    d, i = kt.knn_triton(q, key, 2)
    rd, ri = ref_knn(q, key, 2)
    assert torch.equal(i.cpu(), ri.cpu())
    torch.testing.assert_close(d.cpu().double(), rd.cpu(), rtol=1.2e-7, atol=1e-30)


def test_many_small_sets():
    # conditional IMLE shape: many batches of a few rows (padding stays per-batch small)
    q = torch.randn(40, 3, 5, device=DEV) + 7
    key = torch.randn(40, 9, 5, device=DEV) + 7
    d, i = kt.knn_triton(q, key, 2)
    rd, ri = ref_knn(q, key, 2)
    assert torch.equal(i.cpu(), ri.cpu())
    torch.testing.assert_close(d.cpu().double(), rd.cpu(), rtol=1.2e-7, atol=1e-30)


def test_split_over_m():
    # small N, M split across programs and merged; M not a multiple of the chunk
    q, key = torch.randn(10, 12, device=DEV), torch.randn(700, 12, device=DEV)
    check_exact(q, key, 6, _split=3)
    g = torch.Generator().manual_seed(4)
    key, c = clustered(500, 8, gen=g)
    q, _ = clustered(12, 8, centres=c, gen=g)
    check_exact(q.to(DEV), key.to(DEV), 2, _split=4)


def test_forced_exact_scan():
    # C = k leaves no margin: tiers 1 to 3 cannot certify, every query goes to tier 4
    q, key = torch.randn(20, 6, device=DEV), torch.randn(260, 6, device=DEV)
    tiers = check_exact(q, key, 4, _n_candidates=4)
    assert bool((tiers == 4).all())


def test_all_keys_and_fewer_keys_than_candidates():
    q, key = torch.randn(9, 5, device=DEV), torch.randn(6, 5, device=DEV)
    tiers = check_exact(q, key, 6)  # k = M < C: every key is a candidate, certified at once
    assert bool((tiers == 1).all())
    check_exact(q, key, 1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(dtype):
    g = torch.Generator().manual_seed(5)
    key, c = clustered(260, 20, offset=10.0, std=0.05, gen=g)
    q, _ = clustered(40, 20, centres=c, offset=10.0, std=0.05, gen=g)
    check_exact(q.to(DEV, dtype), key.to(DEV, dtype), 3)


def test_noncontiguous_and_2d():
    key = torch.randn(11, 200, device=DEV).t()  # [200, 11], stride (1, 200)
    q = torch.randn(30, 22, device=DEV)[:, ::2]  # [30, 11], stride (22, 2)
    assert not key.is_contiguous() and not q.is_contiguous()
    d, i = kt.knn_triton(q, key, 3)
    assert d.shape == (30, 3)
    rd, ri = ref_knn(q, key, 3)
    assert torch.equal(i.cpu(), ri.cpu())


def test_candidate_bound_is_a_lower_bound():
    # the tier-1 value of every candidate, turned into a bound, never exceeds the exact
    # squared distance (TF32 and bf16 rounding, data far from the origin, mixed scales)
    g = torch.Generator().manual_seed(6)
    cases = []
    key, c = clustered(300, 32, gen=g)
    q, _ = clustered(40, 32, centres=c, gen=g)
    cases.append((q, key))
    scale = torch.logspace(-3, 3, 70)
    cases.append((torch.randn(40, 70, generator=g) * scale, torch.randn(300, 70, generator=g) * scale))
    cases.append((torch.randn(40, 1, generator=g) + 1e4, torch.randn(300, 1, generator=g) + 1e4))
    for q, key in cases:
        for prec in ("tf32", "bf16"):
            cv, ci, lb, qrow, rho = kt._tier1(q[None].to(DEV), key[None].to(DEV), 8, None, prec, _return_parts=True)
            bound = kt._bound_from_v(cv, qrow, rho)[0].cpu()
            idx = ci[0].long().cpu()
            exact = ((q.double()[:, None, :] - key.double()[idx]) ** 2).sum(-1)
            assert bool((bound <= exact).all()), prec
            # every key outside the candidate set is at least lb away
            full = torch.cdist(q.double(), key.double()) ** 2
            outside = torch.ones_like(full, dtype=torch.bool).scatter_(1, idx, False)
            assert bool((full[outside].view(len(q), -1).min(1).values >= lb[0].cpu()).all()), prec


def test_public_knn_backend_triton_and_grad():
    import fastgen

    q = (torch.randn(2, 20, 6, device=DEV) + 30).requires_grad_()
    key = (torch.randn(2, 90, 6, device=DEV) + 30).requires_grad_()
    d, i = fastgen.knn(q, key, 3, backend="triton")
    rd, ri = ref_knn(q, key, 3)
    assert torch.equal(i.cpu(), ri.cpu())
    d.sum().backward()
    assert q.grad is not None and key.grad is not None
    with _dispatch.use_backend("triton", op="knn"):
        d2, i2 = fastgen.knn(q.detach()[0], key.detach()[0], 2)
    assert torch.equal(i2.cpu(), ri[0, :, :2].cpu())


def test_float64_inputs():
    # float64 data far from the origin: centred in float64, dist2 returned in float64
    g = torch.Generator().manual_seed(7)
    key, c = clustered(200, 10, gen=g, offset=1e6)
    q, _ = clustered(30, 10, centres=c, gen=g, offset=1e6)
    q, key = q.double().to(DEV), key.double().to(DEV)
    q = q + 1e-9 * torch.randn(q.shape, generator=g, dtype=torch.float64).to(DEV)
    d, i = kt.knn_triton(q, key, 3)
    assert d.dtype == torch.float64
    rd, ri = ref_knn(q, key, 3)
    assert torch.equal(i.cpu(), ri.cpu())
    torch.testing.assert_close(d.cpu(), rd.cpu(), rtol=1e-12, atol=0)


def test_local_bound_is_a_lower_bound():
    # tier 2's per-pair bound (local coordinates, AM-GM) never exceeds the exact distance, and
    # every key outside a query's candidates is at least its lb away
    g = torch.Generator().manual_seed(8)
    key, c = clustered(200, 24, n_clusters=3, gen=g)
    q, _ = clustered(192, 24, centres=c, gen=g)
    for prec in ("tf32", "bf16"):
        qd, kd = q[None].to(DEV), key[None].to(DEV)
        mu = kd.mean(1)
        flags = torch.zeros(1, 193, dtype=torch.int32, device=DEV)
        flags[0, :192] = 1
        ek = torch.full((1, 192), 0.05, dtype=torch.float64, device=DEV)
        sub = torch.arange(192, device=DEV)[None]
        rows, cv, ci, rowterm, lb = kt._tier_local(qd, kd, mu, flags, None, None, ek, 1, 4, prec, sub,
                                                   _return_parts=True)
        rows, cv, ci, rowterm, lb = rows[0].cpu(), cv[0].cpu(), ci[0].long().cpu(), rowterm[0].cpu(), lb[0].cpu()
        valid = rows >= 0
        assert int(valid.sum()) == 192
        qq = q.double()[rows[valid]]
        full = torch.cdist(qq, key.double()) ** 2  # [192, M]
        idx = ci[valid]
        exact = full.gather(1, idx)
        bound = cv[valid].double() + rowterm[valid][:, None]
        assert bool((bound <= exact).all()), prec
        outside = torch.ones_like(full, dtype=torch.bool).scatter_(1, idx, False)
        assert bool((full[outside].view(192, -1).min(1).values >= lb[valid]).all()), prec


def test_registered_and_validates():
    name, fn = _dispatch.select("knn", "triton", DEV)
    assert name == "triton" and fn is kt.knn_triton
    q, key = torch.randn(4, 3, device=DEV), torch.randn(5, 3, device=DEV)
    with pytest.raises(ValueError, match="k"):
        kt.knn_triton(q, key, 6)
    with pytest.raises(ValueError, match="_n_candidates"):
        kt.knn_triton(q, key, 2, _n_candidates=3)
    with pytest.raises(ValueError, match="key"):
        kt.knn_triton(q, torch.randn(5, 4, device=DEV), 1)


# ---------------------------------------------------------------------------------------
# GPU: autotuned kernels on large shapes


def _ref_chunked(q, key, k, chunk=32768):
    """Exact top-k on the GPU in float64 by direct differences, chunked over M (ties -> lowest
    index: candidates are merged with a stable sort on (distance, index))."""
    best_d = best_i = None
    for s in range(0, key.shape[0], chunk):
        kk = key[s:s + chunk].double()
        d = torch.cdist(q.double(), kk, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        dd, ii = torch.sort(d, dim=1, stable=True)
        dd, ii = dd[:, :k], ii[:, :k] + s
        if best_d is None:
            best_d, best_i = dd, ii
        else:
            cd, ci = torch.cat([best_d, dd], 1), torch.cat([best_i, ii], 1)
            o = torch.sort(ci, dim=1, stable=True).indices
            cd, ci = cd.gather(1, o), ci.gather(1, o)
            o = torch.sort(cd, dim=1, stable=True).indices[:, :k]
            best_d, best_i = cd.gather(1, o), ci.gather(1, o)
    return best_d, best_i


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 65536, 64, 1), (2048, 32768, 512, 8), (64, 200000, 96, 4),
                                   (1000, 20000, 3072, 1)])
def test_gpu_random_and_clustered(shape):
    n, m, d, k = shape
    for kind in ("random", "clustered"):
        if kind == "random":
            q, key = torch.randn(n, d, device="cuda"), torch.randn(m, d, device="cuda")
        else:
            key, c = clustered(m, d, n_clusters=64)
            q, _ = clustered(n, d, centres=c)
            q, key = q.cuda(), key.cuda()
        dist, idx, tiers = kt.knn_triton(q, key, k, _tiers=True)
        rd, ri = _ref_chunked(q, key, k)
        assert int((idx != ri).any(-1).sum()) == 0, (kind, shape)
        torch.testing.assert_close(dist.double(), rd, rtol=1.2e-7, atol=1e-30)


@pytest.mark.gpu
def test_gpu_batched_small_n_split():
    q = torch.randn(8, 16, 40, device="cuda")
    key = torch.randn(8, 50000, 40, device="cuda")
    d, i = kt.knn_triton(q, key, 5)
    for b in range(8):
        rd, ri = _ref_chunked(q[b], key[b], 5)
        assert torch.equal(i[b], ri)
        torch.testing.assert_close(d[b].double(), rd, rtol=1.2e-7, atol=1e-30)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    # B * M * D > 2^31 elements (fp16 keys, 4.3 GB): the neighbours sit beyond element 2^31
    free, _ = torch.cuda.mem_get_info()
    d, m = 1024, 2 ** 21 + 4096
    if free < 14 * 2 ** 30:
        pytest.skip("needs ~14 GiB of free GPU memory")
    g = torch.Generator(device="cuda").manual_seed(0)
    key = torch.randn(1, m, d, device="cuda", dtype=torch.float16, generator=g)
    targets = torch.arange(m - 64, m, device="cuda")
    q = key[:, targets].float() + 1e-2 * torch.randn(1, 64, d, device="cuda", generator=g)
    q = q.half()
    dist, idx = kt.knn_triton(q, key, 2)
    assert torch.equal(idx[0, :, 0], targets)
    rd, ri = _ref_chunked(q[0], key[0], 2)
    assert torch.equal(idx[0], ri)
    torch.testing.assert_close(dist[0].double(), rd, rtol=1.2e-7, atol=1e-30)


@pytest.mark.parametrize("local", [True, False])
def test_graph_capture_path_runs_every_row(monkeypatch, local):
    # while a CUDA graph is captured the count of uncertified queries cannot be read back:
    # tiers 2-4 then run over all rows (flag-0 rows skipped). Easy random queries mixed with
    # clustered offset ones: the results must equal the normal path's, exactly.
    g = torch.Generator().manual_seed(4)
    key, c = clustered(200, 16, n_clusters=3, gen=g)
    hard, _ = clustered(40, 16, centres=c, gen=g)
    easy = key[torch.randint(0, 200, (24,), generator=g)] + torch.randn(24, 16, generator=g)
    q = torch.cat([easy, hard])[torch.randperm(64, generator=g)]
    q, key = q.to(DEV), key.to(DEV)
    want = kt.knn_triton(q, key, 3, _local=local)
    monkeypatch.setattr(kt, "_graph_capture", lambda device: True)
    got = kt.knn_triton(q, key, 3, _local=local)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    rd, ri = ref_knn(q, key, 3)
    assert torch.equal(got[1].cpu(), ri.cpu())
