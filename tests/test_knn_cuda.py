"""The "cuda" backend of fastgen.knn (csrc/cuda/knn.cu, extension fastgen._C_cuda).

GPU tests (marked ``gpu``; they also skip when fastgen._C_cuda is not built): exact against the
float64 brute force (fastgen.reference.knn) in the sense of tests/test_knn.py - the same indices
(ties -> lowest index) and dist2 within fp32 rounding of the float64 value - on clustered data far
from the origin (std 1e-2, offset 1e3), duplicates and exact ties (the certificate fails and the
double brute-force fallback runs), odd sizes, B > 1 in one call, k = 1..64, fp16 / bf16, few
queries with many keys (the split over M), an input of more than 2^31 elements.
CPU tests: what dispatch and `fastgen info` report when the CUDA extension is absent.
"""
import pytest
import torch

import fastgen
from fastgen import _backend, _dispatch
from fastgen.ops import knn as knn_mod
from fastgen.reference.knn import knn as ref_knn

RTOL = 6.0e-8  # as tests/test_knn.py: fp32 rounding of the exact value, plus the double rounding


def _cuda_ext() -> bool:
    try:
        return torch.cuda.is_available() and _backend.has_kernel("knn", "CUDA")
    except Exception:
        return False


def gpu_test(fn):
    """Marked ``gpu`` (skipped without CUDA, tests/conftest.py) and skipped without fastgen._C_cuda."""
    return pytest.mark.gpu(pytest.mark.skipif(not _cuda_ext(), reason="fastgen._C_cuda not built / no GPU")(fn))


def clustered(n, m, D, *, n_clusters=20, std=1e-2, offset=1e3, seed=0, batch=None, device="cpu"):
    """Points around n_clusters unit-scale centres, std ``std``, all shifted by ``offset``
    (the data of tests/test_knn.py)."""
    g = torch.Generator().manual_seed(seed)
    shape = () if batch is None else (batch,)
    c = torch.randn(*shape, n_clusters, D, generator=g)

    def draw(r):
        lab = torch.randint(n_clusters, (*shape, r), generator=g)
        base = c[lab] if batch is None else torch.gather(c, 1, lab[..., None].expand(*shape, r, D))
        return (base + std * torch.randn(*shape, r, D, generator=g) + offset).to(device)

    return draw(n), draw(m)


def check(q, key, k, *, values=True):
    d, i = fastgen.knn(q, key, k, backend="cuda")
    rd, ri = ref_knn(q, key, k)
    assert d.device == q.device and i.device == q.device
    assert d.dtype == torch.float32 and i.dtype == torch.int64
    assert d.shape == rd.shape and i.shape == ri.shape
    wrong = (i != ri).any(-1)
    assert int(wrong.sum()) == 0, f"{int(wrong.sum())} of {wrong.numel()} queries got a wrong neighbour"
    if values:
        torch.testing.assert_close(d.double(), rd, rtol=RTOL, atol=1e-30)
    return d, i


# ------------------------------------------------------------------------------- GPU: exactness
@pytest.mark.parametrize("D,k", [(1, 1), (3, 1), (32, 4), (64, 1), (64, 16), (200, 4), (512, 2), (3072, 8)])
@gpu_test
def test_clustered_offset(D, k):
    q, key = clustered(300, 5000, D, seed=D + k, device="cuda")
    check(q, key, k)


@gpu_test
def test_clustered_offset_defeats_fp32_expansion():
    """The data above is hard: the fp32 matmul expansion (torch.cdist) is wrong on it."""
    q, key = clustered(256, 5000, 64, device="cuda")
    wrong = (torch.cdist(q, key).argmin(1) != ref_knn(q, key, 1)[1][:, 0]).sum()
    assert int(wrong) > 32


@pytest.mark.parametrize("N,M,D,k", [(1, 1, 1, 1), (1, 7, 5, 7), (37, 211, 9, 3), (65, 63, 33, 16), (64, 64, 64, 64),
                                     (129, 1000, 513, 5), (300, 4097, 31, 64), (2, 65, 1, 1)])
@gpu_test
def test_odd_sizes(N, M, D, k):
    g = torch.Generator().manual_seed(N * M + D + k)
    q = torch.randn(N, D, generator=g).cuda()
    key = (torch.randn(M, D, generator=g) * 2.0).cuda()
    check(q, key, k)


@gpu_test
def test_k_1_to_64():
    q, key = clustered(100, 3000, 24, seed=3, device="cuda")
    rd, ri = ref_knn(q, key, 64)
    for k in range(1, 65):
        d, i = fastgen.knn(q, key, k, backend="cuda")
        assert torch.equal(i, ri[:, :k]), f"k={k}"
        torch.testing.assert_close(d.double(), rd[:, :k], rtol=RTOL, atol=1e-30)


@gpu_test
def test_duplicates_and_ties():
    """Exact ties: the lowest index wins, also when more keys tie than the fast pass keeps as
    candidates (the certificate fails; the double brute-force fallback settles the query)."""
    g = torch.Generator().manual_seed(5)
    key = torch.randint(0, 3, (600, 4), generator=g).float().cuda()   # 81 points, ~7 copies each
    q = torch.randint(0, 3, (50, 4), generator=g).float().cuda()
    check(q, key, 7)
    check(q, key, 64)
    # 100 copies of one point inside a cloud: the k nearest are the lowest-index copies
    cloud = torch.randn(5000, 8, generator=g) * 3 + 1e3
    point = torch.full((1, 8), 1e3)
    key2 = torch.cat([cloud[:200], point.expand(100, 8), cloud[200:]]).cuda()
    q2 = (point + 1e-3 * torch.randn(10, 8, generator=g)).cuda()
    for k in (1, 3, 40, 64):
        d, i = check(q2, key2, k)
        assert i.min() >= 200 and i.max() <= 200 + k - 1
    # a query equidistant from keys: exact ties broken by index
    key3 = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0], [1.0, 1.0], [0.0, 0.0]]).cuda()
    d, i = fastgen.knn(torch.zeros(1, 2, device="cuda"), key3, 5, backend="cuda")
    assert i.tolist() == [[5, 4, 0, 1, 2]]
    assert d.tolist() == [[0.0, 2.0, 4.0, 4.0, 4.0]]


@gpu_test
def test_batched_one_call():
    """B sets in one call equal B separate 2-D calls, exactly."""
    q, key = clustered(70, 900, 40, batch=5, seed=7, device="cuda")
    d, i = check(q, key, 9)
    for b in range(5):
        d2, i2 = fastgen.knn(q[b], key[b], 9, backend="cuda")
        assert torch.equal(i2, i[b]) and torch.equal(d2, d[b])


@pytest.mark.parametrize("B,N,M,D,k", [(512, 1, 20, 3072, 1), (2048, 4, 50, 64, 2), (64, 33, 300, 129, 10)])
@gpu_test
def test_conditional_imle_shapes(B, N, M, D, k):
    """Conditional IMLE: many sets of few points (one example vs a few samples per condition)."""
    q, key = clustered(N, M, D, batch=B, n_clusters=4, seed=B + N, device="cuda")
    check(q, key, k)


@gpu_test
def test_small_n_large_m_split():
    """Few queries, many keys: the keys are split over blocks and the lists merged."""
    q, key = clustered(3, 300000, 32, seed=13, device="cuda")
    check(q, key, 16)
    qb, kb = clustered(2, 100000, 16, batch=2, seed=14, device="cuda")
    check(qb, kb, 64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@gpu_test
def test_half_inputs(dtype):
    q, key = clustered(200, 3000, 48, offset=10.0, std=1e-1, seed=9)
    q, key = q.to(dtype).cuda(), key.to(dtype).cuda()
    d, _ = check(q, key, 5)
    assert d.dtype == torch.float32
    qb, kb = clustered(16, 300, 24, offset=10.0, std=1e-1, batch=6, seed=10)
    check(qb.to(dtype).cuda(), kb.to(dtype).cuda(), 3)
    # offset 1e3 in 16 bits: the clusters collapse onto a few representable points (massive exact
    # ties; most queries go to the fallback)
    q, key = clustered(100, 2000, 16, seed=11)
    check(q.to(dtype).cuda(), key.to(dtype).cuda(), 20)


@gpu_test
def test_huge_and_tiny_values():
    """Squares that overflow fp32 (values 1e19) and that underflow it (1e-21): the certificate
    cannot vouch for them and the double fallback keeps the neighbours exact."""
    g = torch.Generator().manual_seed(14)
    q, key = (torch.randn(40, 6, generator=g) * 1e19).cuda(), (torch.randn(300, 6, generator=g) * 1e19).cuda()
    check(q, key, 3, values=False)
    q, key = (torch.randn(40, 6, generator=g) * 1e-21).cuda(), (torch.randn(300, 6, generator=g) * 1e-21).cuda()
    check(q, key, 3, values=False)


@gpu_test
def test_non_contiguous_inputs():
    q, key = clustered(64, 800, 40, seed=15, device="cuda")
    check(q[:, ::2], key[:, ::2], 4)
    check(q.t().contiguous().t(), key, 4)


@gpu_test
def test_more_than_2_31_elements():
    """A key tensor of 2^31 + 3 * 1024 fp16 elements (4 GiB): int64 offsets. The planted
    neighbours lie past element 2^31."""
    M, D = 2 ** 21 + 3, 1024
    g = torch.Generator(device="cuda").manual_seed(16)
    key = torch.randn(1, M, D, generator=g, device="cuda", dtype=torch.float16)
    assert key.numel() > 2 ** 31
    rows = torch.tensor([M - 1, M - 2, 2 ** 21 + 1, 5], device="cuda")
    q = (key[0, rows].float() + 1e-2 * torch.randn(4, D, generator=g, device="cuda")).half()[None]
    d, i = fastgen.knn(q, key, 2, backend="cuda")
    assert i[0, :, 0].tolist() == rows.tolist()
    # exact reference in float64, chunked over the keys
    qd = q[0].double()
    full = torch.cat([((key[0, s:s + 2 ** 18].double()[None] - qd[:, None]) ** 2).sum(-1)
                      for s in range(0, M, 2 ** 18)], dim=1)
    rd, ri = torch.sort(full, dim=1, stable=True)
    assert torch.equal(i[0], ri[:, :2])
    torch.testing.assert_close(d[0].double(), rd[:, :2], rtol=RTOL, atol=1e-30)


@gpu_test
def test_gradients():
    torch.manual_seed(16)
    q = torch.randn(12, 4, device="cuda", requires_grad=True)
    key = torch.randn(30, 4, device="cuda", requires_grad=True)
    d, i = fastgen.knn(q, key, 3, backend="cuda")
    g = torch.randn_like(d)
    (d * g).sum().backward()
    diff = q.detach()[:, None, :] - key.detach()[i]
    torch.testing.assert_close(q.grad, 2 * (g[..., None] * diff).sum(1))
    want_k = torch.zeros_like(key).index_add_(0, i.flatten(), (-2 * g[..., None] * diff).reshape(-1, 4))
    torch.testing.assert_close(key.grad, want_k)


@gpu_test
def test_unsupported_inputs_raise():
    q, key = torch.randn(5, 3, device="cuda"), torch.randn(100, 3, device="cuda")
    with pytest.raises(TypeError, match="query"):
        fastgen.knn(q.double(), key.double(), 2, backend="cuda")
    with pytest.raises(ValueError, match="k"):
        fastgen.knn(q, key, 65, backend="cuda")
    with pytest.raises(ValueError, match="query"):
        fastgen.knn(torch.cat([q, torch.full((1, 3), float("nan"), device="cuda")]), key, 2, backend="cuda")


@gpu_test
def test_auto_picks_cuda_for_batched_small_m():
    name, _ = _dispatch.select("knn", "auto", "cuda", B=64, N=1, M=50, D=256, k=1, dtype=torch.float32,
                               device="cuda")
    order = _dispatch.ORDER["knn"]["cuda"]
    # "cuda" wins unless a backend before it in the coarse order is available and accepts the shape
    assert name == "cuda" or order.index(name) < order.index("cuda")


# ------------------------------------------------------------------------------- CPU: reporting
def test_auto_filter_rules():
    ok = knn_mod._knn_cuda_ok
    base = dict(N=1, D=64, k=1, dtype=torch.float32, device="cuda")
    assert ok(B=64, M=50, **base)                                         # batched, few keys
    assert not ok(B=64, M=50, **{**base, "device": "cpu"})
    assert not ok(B=64, M=50, **{**base, "dtype": torch.float64})
    assert not ok(B=64, M=50, **{**base, "k": 65})
    triton_missing = _dispatch.unavailable_reason("knn", "triton", "cuda") is not None
    assert ok(B=1, M=10 ** 6, **base) == triton_missing                   # otherwise: after Triton


@pytest.mark.skipif(_backend.load_cuda_ext() is not None, reason="fastgen._C_cuda is loaded here")
def test_report_when_cuda_extension_absent():
    why = _backend.cuda_ext_error()
    assert isinstance(why, str) and why
    assert not _backend.has_kernel("knn", "CUDA")
    reason = _dispatch.unavailable_reason("knn", "cuda", "cuda")
    assert reason is not None
    name, _ = _dispatch.select("knn", "auto", "cuda", B=64, N=1, M=50, D=64, k=1, dtype=torch.float32,
                               device="cuda")
    assert name != "cuda"
    with pytest.raises(RuntimeError, match="cuda"):
        _dispatch.select("knn", "cuda", "cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        fastgen.knn(torch.randn(3, 2), torch.randn(5, 2), 1, backend="cuda")
    from fastgen._info import info_lines

    rows = [line.split() for line in info_lines()]
    knn_cuda = [r for r in rows if r[:3] == ["knn", "cuda", "cuda"]]
    assert len(knn_cuda) == 1 and knn_cuda[0][3] == "missing:"


def test_cuda_extension_loads_after_c():
    """fastgen._C_cuda needs fastgen._C (schemas); with _C disabled the reason says so."""
    import subprocess
    import sys

    code = ("import os; os.environ['FASTGEN_DISABLE_EXT'] = '1'\n"
            "from fastgen import _backend\n"
            "assert _backend.load_cuda_ext() is None\n"
            "assert not _backend.has_kernel('knn', 'CUDA')\n"
            "print(_backend.cuda_ext_error())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "fastgen._C" in out.stdout and "FASTGEN_DISABLE_EXT" in out.stdout
