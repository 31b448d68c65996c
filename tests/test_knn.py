"""fastgen.knn against the float64 brute force (fastgen.reference.knn), on every backend here.

Exact means: the same indices as the reference (ties -> lowest index, so zero wrong neighbours)
and dist2 within fp32 rounding of the float64 value. Hard inputs: clustered data far from the
origin (std 1e-2 clusters offset by 1e3, where the plain fp32 expansion is wrong on most
queries), duplicates and exact ties, D = 1 and odd D, k = 1..16, batched 3-D, fp16 / bf16.
"""
import pytest
import torch

import fastgen
from fastgen import _dispatch
from fastgen.reference.knn import knn as ref_knn
from conftest import has_ext_kernel, has_faiss, has_triton

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_NO_EXT = not has_ext_kernel("knn")
BACKENDS = [
    "torch",
    pytest.param("cpu", marks=pytest.mark.skipif(_NO_EXT, reason="fastgen._C not built")),
    pytest.param("faiss", marks=pytest.mark.skipif(not has_faiss(), reason="faiss not installed")),
]
# the Triton backend runs in the interpreter on CPU (slow): only on the small cases
BACKENDS_T = BACKENDS + [pytest.param("triton", marks=pytest.mark.skipif(not has_triton(), reason="no triton"))]

RTOL = 6.0e-8  # |fl32(x) - x| <= 2^-24 |x|, plus the double rounding of the exact value


def clustered(n, m, D, *, n_clusters=20, std=1e-2, offset=1e3, seed=0, batch=None):
    """Points around n_clusters unit-scale centres, std ``std``, all shifted by ``offset``."""
    g = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    c = torch.randn(*shape, n_clusters, D, generator=g)

    def draw(r):
        lab = torch.randint(n_clusters, (*shape, r), generator=g)
        if batch is None:
            base = c[lab]
        else:
            base = torch.gather(c, 1, lab[..., None].expand(*shape, r, D))
        return base + std * torch.randn(*shape, r, D, generator=g) + offset

    return draw(n), draw(m)


def check(q, key, k, backend):
    d, i = fastgen.knn(q, key, k, backend=backend)
    rd, ri = ref_knn(q, key, k)
    assert i.dtype == torch.int64 and i.shape == ri.shape
    want = torch.float64 if torch.float64 in (q.dtype, key.dtype) else torch.float32
    assert d.dtype == want and d.shape == rd.shape
    wrong = (i != ri).any(-1)
    assert int(wrong.sum()) == 0, f"{int(wrong.sum())} of {wrong.numel()} queries got a wrong neighbour"
    rtol = 1e-15 if want == torch.float64 else RTOL
    torch.testing.assert_close(d.double(), rd, rtol=rtol, atol=1e-30)
    return d, i


@pytest.mark.parametrize("backend", BACKENDS_T)
def test_random_small(backend):
    torch.manual_seed(1)
    check(torch.randn(37, 9), torch.randn(211, 9), 3, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,M,D,k", [(40, 300, 1, 3), (64, 500, 7, 1), (50, 333, 64, 16), (23, 200, 513, 5),
                                     (5, 4000, 16, 2), (40, 1000, 16, 100)])
def test_random(backend, N, M, D, k):
    torch.manual_seed(N + M + D + k)
    check(torch.randn(N, D), torch.randn(M, D) * 2.0, k, backend)


@pytest.mark.parametrize("backend", BACKENDS_T)
def test_clustered_offset_small(backend):
    q, key = clustered(40, 400, 32)
    check(q, key, 4, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("D,k", [(3, 1), (64, 1), (64, 16), (200, 4), (512, 2)])
def test_clustered_offset(backend, D, k):
    q, key = clustered(64, 1500, D, seed=D + k)
    check(q, key, k, backend)


def test_clustered_offset_defeats_plain_fp32():
    """The data of the tests above is hard: the plain fp32 expansion (torch.cdist) is wrong."""
    q, key = clustered(64, 1500, 64)
    wrong = (torch.cdist(q, key).argmin(1) != ref_knn(q, key, 1)[1][:, 0]).sum()
    assert int(wrong) > 32


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_1_to_16(backend):
    q, key = clustered(30, 700, 24, seed=3)
    rd, ri = ref_knn(q, key, 16)
    for k in range(1, 17):
        d, i = fastgen.knn(q, key, k, backend=backend)
        assert torch.equal(i, ri[:, :k]), f"k={k}"
        torch.testing.assert_close(d.double(), rd[:, :k], rtol=RTOL, atol=1e-30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_and_ties(backend):
    """Exact ties (integer grid, repeated keys): the lowest index wins, also when more keys tie
    at the k-th distance than the fast pass keeps as candidates (forces the exact fallback)."""
    g = torch.Generator().manual_seed(5)
    key = torch.randint(0, 3, (600, 4), generator=g).float()        # 81 distinct points, ~7 copies each
    q = torch.randint(0, 3, (50, 4), generator=g).float()
    check(q, key, 7, backend)
    # 40 copies of one point in front of a cloud: the k nearest are the lowest-index copies
    cloud = torch.randn(500, 8, generator=g) * 3 + 1e3
    point = torch.full((1, 8), 1e3)
    key2 = torch.cat([cloud[:200], point.expand(40, 8), cloud[200:]])
    q2 = point + 1e-3 * torch.randn(10, 8, generator=g)
    d, i = check(q2, key2, 3, backend)
    assert i.min() >= 200 and i.max() <= 202
    # a query equidistant from keys: exact ties broken by index
    key3 = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0], [1.0, 1.0], [0.0, 0.0]])
    d, i = fastgen.knn(torch.zeros(1, 2), key3, 5, backend=backend)
    assert i.tolist() == [[5, 4, 0, 1, 2]]
    assert d.tolist() == [[0.0, 2.0, 4.0, 4.0, 4.0]]


@pytest.mark.parametrize("backend", BACKENDS_T)
def test_batched(backend):
    q, key = clustered(20, 200, 12, batch=2, seed=7)
    d, i = check(q, key, 5, backend)
    for b in range(2):  # the same as 2-D calls
        d2, i2 = fastgen.knn(q[b], key[b], 5, backend=backend)
        assert torch.equal(i2, i[b]) and torch.equal(d2, d[b])


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_many_small(backend):
    """Conditional IMLE shape: many batches of few points (one thread per batch in C++)."""
    # (big enough for the C++ kernel to run one thread per batch element)
    n, m, D = (64, 2000, 64) if backend == "cpu" else (8, 100, 8)
    q, key = clustered(n, m, D, batch=16, seed=8)
    check(q, key, 2, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs(backend, dtype):
    q, key = clustered(40, 500, 16, offset=10.0, std=1e-1, seed=9)
    d, _ = check(q.to(dtype), key.to(dtype), 3, backend)
    assert d.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_inputs(backend):
    """float64 inputs: neighbours exact in float64, dist2 returned in float64."""
    q, key = clustered(30, 400, 10, seed=10)
    q, key = q.double() + 1e-9 * torch.rand(30, 10, dtype=torch.float64), key.double()
    check(q, key, 3, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    q, key = clustered(20, 200, 8, seed=11)
    d, _ = check(q.half(), key, 2, backend)
    assert d.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_equals_m_and_tiny_m(backend):
    torch.manual_seed(12)
    check(torch.randn(10, 5), torch.randn(7, 5), 7, backend)
    check(torch.randn(10, 5), torch.randn(1, 5), 1, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_n_large_m(backend):
    """Few queries, many keys: the C++ kernel splits M across threads and merges."""
    n, m, D = (4, 300000, 64) if backend == "cpu" else (3, 20000, 16)  # cpu: above its threading threshold
    q, key = clustered(n, m, D, seed=13)
    check(q, key, 4, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_and_tiny_values(backend):
    """Squares that overflow fp32 go to the exact double path; tiny scales stay exact."""
    torch.manual_seed(14)
    check(torch.randn(20, 6) * 5e17, torch.randn(100, 6) * 5e17, 2, backend)  # (A + B)^2 > 1e36
    check(torch.randn(20, 6) * 1e-15, torch.randn(100, 6) * 1e-15, 2, backend)


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu", marks=pytest.mark.skipif(_NO_EXT, reason="no ext"))])
def test_gradcheck_float64(backend):
    torch.manual_seed(15)
    q = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    key = torch.randn(2, 14, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fastgen.knn(a, b, 3, backend=backend)[0], (q, key), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_matches_formula(backend):
    """grad_q = 2 sum_j g_j (q - key[idx_j]); grad_key = index_add of -2 g (q - key[idx])."""
    torch.manual_seed(16)
    q = torch.randn(12, 4, requires_grad=True)
    key = torch.randn(30, 4, requires_grad=True)
    d, i = fastgen.knn(q, key, 3, backend=backend)
    g = torch.randn_like(d)
    (d * g).sum().backward()
    diff = q.detach()[:, None, :] - key.detach()[i]
    want_q = 2 * (g[..., None] * diff).sum(1)
    want_k = torch.zeros_like(key).index_add_(0, i.flatten(), (-2 * g[..., None] * diff).reshape(-1, 4))
    torch.testing.assert_close(q.grad, want_q)
    torch.testing.assert_close(key.grad, want_k)


def test_grad_half_dtype():
    q = torch.randn(8, 3).half().requires_grad_()
    key = torch.randn(20, 3).half().requires_grad_()
    d, _ = fastgen.knn(q, key, 2)
    d.sum().backward()
    assert q.grad.dtype == torch.float16 and key.grad.dtype == torch.float16
    assert torch.isfinite(q.grad).all() and key.grad.abs().sum() > 0


# ------------------------------------------------------------------------------- dispatch
def test_auto_backend_on_cpu():
    name, _ = _dispatch.select("knn", "auto", "cpu", N=10, M=10, D=3, k=1, dtype=torch.float32, device="cpu")
    assert name == ("torch" if _NO_EXT else "cpu")
    with _dispatch.use_backend("torch", "knn"):
        name, _ = _dispatch.select("knn", "auto", "cpu", N=10, M=10, D=3, k=1, dtype=torch.float32, device="cpu")
        assert name == "torch"


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,exc,word", [
    (lambda q, k: fastgen.knn(q, k, 0), ValueError, "k"),
    (lambda q, k: fastgen.knn(q, k, 11), ValueError, "k"),
    (lambda q, k: fastgen.knn(q, k, 2.0), TypeError, "k"),
    (lambda q, k: fastgen.knn(q, k, True), TypeError, "k"),
    (lambda q, k: fastgen.knn(q, k[:, :2]), ValueError, "D"),
    (lambda q, k: fastgen.knn(q[None].expand(2, -1, -1), k[None].expand(3, -1, -1)), ValueError, "batch"),
    (lambda q, k: fastgen.knn(q[None], k), ValueError, "key"),
    (lambda q, k: fastgen.knn(q[:, 0], k), ValueError, "query"),
    (lambda q, k: fastgen.knn(q[None, None], k[None, None]), ValueError, "query"),
    (lambda q, k: fastgen.knn(q[:0], k), ValueError, "query"),
    (lambda q, k: fastgen.knn(q, k[:0]), ValueError, "key"),
    (lambda q, k: fastgen.knn(q.long(), k), TypeError, "query"),
    (lambda q, k: fastgen.knn(q, k.int()), TypeError, "key"),
    (lambda q, k: fastgen.knn(q.numpy(), k), TypeError, "query"),
    (lambda q, k: fastgen.knn(q, k.to("meta")), ValueError, "device"),
    (lambda q, k: fastgen.knn(torch.cat([q[:1] * float("nan"), q]), k), ValueError, "query"),
    (lambda q, k: fastgen.knn(q, torch.cat([k, k[:1] * float("inf")])), ValueError, "key"),
    (lambda q, k: fastgen.knn(q, k, backend="nope"), ValueError, "backend"),
    (lambda q, k: fastgen.knn(q, k, backend=3), TypeError, "backend"),
])
def test_bad_input(call, exc, word):
    q, k = torch.randn(5, 3), torch.randn(10, 3)
    with pytest.raises(exc, match=word):
        call(q, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_inf_every_backend(backend):
    q, key = torch.randn(6, 3), torch.randn(40, 3)
    with pytest.raises(ValueError, match="query"):
        fastgen.knn(torch.cat([q, torch.full((1, 3), float("nan"))]), key, 2, backend=backend)
    with pytest.raises(ValueError, match="key"):
        fastgen.knn(q, torch.cat([key, torch.full((1, 3), float("-inf"))]), 2, backend=backend)
    with pytest.raises(ValueError, match="key"):  # few keys: the brute-force path
        fastgen.knn(q, torch.cat([key[:3], torch.full((1, 3), float("nan"))]), 2, backend=backend)


# ------------------------------------------------------------------------------- C++ kernel paths
_CPU = pytest.mark.skipif(_NO_EXT, reason="fastgen._C not built")


@_CPU
@pytest.mark.parametrize("M", [49, 64, 65, 81, 95, 97])  # partial key tiles: 1, 16, 17, 33, 47, 1 keys past 48
@pytest.mark.parametrize("N,D", [(1, 17), (7, 1), (9, 100), (15, 33)])
def test_cpu_packing_boundaries(N, M, D):
    """Key tiles of 48 (gathered 16 keys at a time, masked past M), query panels of 8, any D."""
    q, key = clustered(N, M, D, n_clusters=3, seed=N * M + D)
    check(q, key, 2, "cpu")


@_CPU
@pytest.mark.parametrize("nt", [1, 2])
def test_cpu_large_d_k_gt_1(nt):
    """D = 512 with k = 8 on offset clusters, on one thread and on two (query ranges x key chunks)."""
    q, key = clustered(160, 1600, 512, n_clusters=8, seed=21)  # N M D above the kernel's threading threshold
    old = torch.get_num_threads()
    torch.set_num_threads(nt)
    try:
        check(q, key, 8, "cpu")
    finally:
        torch.set_num_threads(old)


@_CPU
def test_cpu_threaded_ranges_and_rescan():
    """Two threads, many query ranges, and most queries uncertified (integer grid: masses of exact
    ties at the k-th distance) so the pruned rescan runs over several ranges and key chunks."""
    g = torch.Generator().manual_seed(22)
    key = torch.randint(0, 4, (8200, 4), generator=g).float() + 1e3
    q = torch.randint(0, 4, (2050, 4), generator=g).float() + 1e3
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        check(q, key, 3, "cpu")
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------ the cpu backend's cluster pruning
# fastgen/ops/knn.py _pruned_search: the C++ kernel on cluster-pruned key subsets must return the
# kernel's full-scan answer index for index and bit for bit (ties to the lowest index included).
def _pruning_data(case, g):
    def blobs(n, centres, scale):
        return centres[torch.randint(len(centres), (n,), generator=g)] + scale(n)
    if case == "clustered-offset":       # the benchmark's data, smaller: 60 tight clusters at 1e3
        c = torch.randn(60, 160, generator=g, dtype=torch.float64) * 3
        noise = lambda n: 1e-2 * torch.randn(n, 160, generator=g, dtype=torch.float64)  # noqa: E731
        return (blobs(500, c, noise) + 1e3).float(), (blobs(6000, c, noise) + 1e3).float()
    if case == "lattice-ties-duplicates":  # exact ties everywhere: cluster centres + {0, 1/4}^D
        c = torch.randint(-40, 40, (30, 128), generator=g).double()
        lat = lambda n: torch.randint(0, 2, (n, 128), generator=g).double() / 4  # noqa: E731
        key = blobs(4000, c, lat)
        key = torch.cat([key, key[:1500]])  # duplicates, later indices
        q = torch.cat([key[:200], blobs(300, c, lat)])
        return q.float(), key.float()
    if case == "split-clusters":  # fewer clusters than pivots: every cluster split between groups
        c = torch.randn(4, 256, generator=g, dtype=torch.float64) * 10
        noise = lambda n: 0.05 * torch.randn(n, 256, generator=g, dtype=torch.float64)  # noqa: E731
        return blobs(400, c, noise).float(), blobs(5000, c, noise).float()
    if case == "tiny-clusters":  # many clusters of 2-3 keys: k exceeds most groups
        c = torch.randn(2000, 128, generator=g, dtype=torch.float64) * 5
        noise = lambda n: 1e-3 * torch.randn(n, 128, generator=g, dtype=torch.float64)  # noqa: E731
        return blobs(300, c, noise).float(), blobs(5000, c, noise).float()
    raise ValueError(case)


@pytest.mark.skipif(not has_ext_kernel("knn"), reason="fastgen._C not built")
@pytest.mark.parametrize("case", ["clustered-offset", "lattice-ties-duplicates", "split-clusters", "tiny-clusters"])
@pytest.mark.parametrize("k", [1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cpu_pruned_search_is_the_full_scan(case, k, dtype):
    from fastgen import _backend
    from fastgen.ops import knn as K

    kernel = _backend.ext_op("_knn_kernel")
    q, key = _pruning_data(case, torch.Generator().manual_seed(3))
    q, key = q.to(dtype)[None], key.to(dtype)[None]
    sizes = []

    def counting(a, b, kk):
        sizes.append(b.shape[1])
        return kernel(a, b, kk)

    d, i = K._pruned_search(q, key, k, counting)
    d0, i0 = kernel(q, key, k)
    assert torch.equal(i, i0) and torch.equal(d, d0)
    if case != "tiny-clusters":  # the pruning ran: most searches saw a fraction of the keys
        assert len(sizes) > 1 and sum(sizes) < 0.5 * len(sizes) * key.shape[1]
    rows = torch.arange(0, q.shape[1], 37)
    rd, ri = ref_knn(q[0, rows].double(), key[0].double(), k)
    assert torch.equal(i[0, rows], ri)


@pytest.mark.skipif(not has_ext_kernel("knn"), reason="fastgen._C not built")
def test_cpu_pruned_search_falls_back():
    from fastgen import _backend
    from fastgen.ops import knn as K

    kernel = _backend.ext_op("_knn_kernel")
    calls = []

    def counting(a, b, kk):
        calls.append(b.shape[1])
        return kernel(a, b, kk)

    g = torch.Generator().manual_seed(4)
    # no cluster structure: one search of every key
    q, key = torch.randn(1, 300, 128, generator=g), torch.randn(1, 4000, 128, generator=g)
    d, i = K._pruned_search(q, key, 2, counting)
    assert calls == [4000] and torch.equal(i, kernel(q, key, 2)[1])
    # NaN / inf anywhere (also in a key no query would have searched): the kernel's ValueError
    q, key = _pruning_data("clustered-offset", g)
    for name, bad in (("key", key.clone()), ("query", q.clone())):
        bad[-1, 5] = float("nan") if name == "key" else float("inf")
        a, b = (q, bad) if name == "key" else (bad, key)
        with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
            K._pruned_search(a[None], b[None], 1, kernel)
    # lowered fp32 matmul precision: the bounds widen with it, the answer stays exact
    prec = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        d, i = K._pruned_search(q[None], key[None], 3, kernel)
    finally:
        torch.set_float32_matmul_precision(prec)
    assert torch.equal(i, kernel(q[None], key[None], 3)[1])


@pytest.mark.skipif(not has_ext_kernel("knn"), reason="fastgen._C not built")
def test_cpu_pruned_search_end_to_end(monkeypatch):
    # through fastgen.knn with the size threshold lowered: values, indices, gradients
    from fastgen.ops import knn as K

    monkeypatch.setattr(K, "_PRUNE_MIN_WORK", 0)
    sizes, pruned = [], K._pruned_search

    def spy(query, key, k, kernel):  # the searches the pruned path makes, by key count
        def counting(a, b, kk):
            sizes.append(b.shape[1])
            return kernel(a, b, kk)
        return pruned(query, key, k, counting)

    monkeypatch.setattr(K, "_pruned_search", spy)
    q, key = _pruning_data("clustered-offset", torch.Generator().manual_seed(5))
    qg, kg = q.clone().requires_grad_(), key.clone().requires_grad_()
    with _dispatch.use_backend("cpu", "knn"):
        d, i = fastgen.knn(qg, kg, 2)
        (d.sum()).backward()
    assert len(sizes) > 1 and max(sizes) < key.shape[0]  # it pruned: no search saw every key
    rd, ri = ref_knn(q.double(), key.double(), 2)
    assert torch.equal(i, ri)
    torch.testing.assert_close(d.double(), rd, rtol=1e-6, atol=1e-6)
    want_q = 2 * (q.double()[:, None, :] - key.double()[ri]).sum(1)
    torch.testing.assert_close(qg.grad.double(), want_q, rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not has_ext_kernel("knn"), reason="fastgen._C not built")
def test_cpu_pruned_search_float64_structure_below_fp32_resolution():
    # clusters of std 1e-7 at 1e3: finer than fp32 there; the float64 bounds must still hold
    from fastgen import _backend
    from fastgen.ops import knn as K

    kernel = _backend.ext_op("_knn_kernel")
    g = torch.Generator().manual_seed(6)
    c = torch.randn(30, 160, generator=g, dtype=torch.float64)
    q = c[torch.randint(0, 30, (400,), generator=g)] + 1e-7 * torch.randn(400, 160, generator=g, dtype=torch.float64)
    key = c[torch.randint(0, 30, (5000,), generator=g)] + 1e-7 * torch.randn(5000, 160, generator=g,
                                                                              dtype=torch.float64)
    q, key = (q + 1e3)[None], (key + 1e3)[None]
    for k in (1, 4):
        d, i = K._pruned_search(q, key, k, kernel)
        d0, i0 = kernel(q, key, k)
        assert torch.equal(i, i0) and torch.equal(d, d0)
