"""fastgen.knn: exact k nearest neighbours (squared Euclidean), batched, differentiable.

Backends (chosen by :mod:`fastgen._dispatch`; ``backend="auto"`` picks "cpu" for CPU tensors
when the compiled extension is built, else "torch"; on CUDA "triton" (fastgen/ops/knn_triton.py),
then "cuda", then "faiss" (faiss-gpu), then "torch"; "cuda" is taken by "auto" only for batched
3-D inputs with M <= 4096 keys per set, or when Triton is unavailable: its crossover against
"triton" and "faiss" is unmeasured):

* ``"cpu"``: the C++ kernel of csrc/cpu/knn.cpp (OpenMP, AVX-512 / AVX2 micro-kernel): centred
  fp32 expansion ``||b||^2 - 2 a.b`` on register tiles, running top-C per query, exact re-rank
  in double, rigorous certificate, pruned exact rescan of uncertified queries. Large searches
  (one set, D >= 128, N M D >= 2^31) on data with cluster structure first partition the keys
  around sqrt(M) pivots and search each query's candidate groups only, skipping the groups the
  triangle inequality rules out (:func:`_pruned_search`: the same answer, bit for bit).
* ``"cuda"``: the CUDA kernel of csrc/cuda/knn.cu (extension fastgen._C_cuda, built with
  FASTGEN_CUDA=1): fp32 direct-difference distances on shared-memory tiles (no cancellation),
  running top-C per query, exact double re-rank, certificate from the relative error bound
  gamma_{D+2} of the direct differences, double brute force for uncertified queries (ties);
  B sets in one launch; float32 / float16 / bfloat16, k <= 64.
* ``"torch"``: the same algorithm in plain torch (chunked ``baddbmm`` + ``topk``, exact re-rank
  in float64, certificate, chunked direct-difference brute force for uncertified queries);
  memory O((N + M) D + chunk), any device.
* ``"faiss"``: faiss-cpu (``faiss.knn``) on CPU tensors, faiss-gpu (``faiss.knn_gpu`` through
  ``faiss.contrib.torch_utils``, no host copy) on CUDA tensors, made exact the same way: faiss
  searches the centred fp32 data for C candidates, which are re-ranked exactly; queries the
  certificate cannot settle get the float64 candidate pass of the torch path, then brute force.

Why the certificate: for data far from the origin the fp32 expansion
``||q||^2 + ||k||^2 - 2 q.k`` cancels catastrophically (offset 1e3, clusters of std 1e-2: faiss and
torch.cdist return the wrong neighbour for almost every query). Centring (subtracting the key
mean, in double) removes the offset; the remaining rounding error is bounded rigorously by
``delta = 2u B^2 + 2 (gamma_s + u) A B + (2 eps + eps^2) (A + B)^2`` (A = ||q - mu||,
B = max ||k - mu||, u = 2^-24, gamma_s the worst-case error of an s-step fp32 dot product,
eps = 2^-24 + 2^-52 the rounding of the centred data). Every key outside the C candidates has
an exact distance >= ||a||^2 + T - delta (T = the C-th approximate value), so when that is
strictly above the exact k-th distance of the candidates, the k neighbours are exact.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import math
import operator
import os
import threading

import torch

from .. import _backend, _compile, _dispatch, _validate

__all__ = ["knn", "n_candidates"]

_U32 = 2.0 ** -24           # unit roundoff of fp32
_U64 = 2.0 ** -53
_EPS_C = 2.0 ** -24 + 2.0 ** -52   # rounding of the centred data to fp32 (double subtraction first)
_U_TF32 = 2.0 ** -11        # TF32 operands: 10-bit fraction, round to nearest
_U_BF16 = 2.0 ** -8
# elements of the largest temporary of the torch / faiss paths: 32 MiB of fp64 on CPU (cache
# friendly), 1 GiB of fp32 on CUDA (few, large kernels)
_CHUNK_ELEMS = {"cpu": 1 << 22, "cuda": 1 << 28}


def n_candidates(k: int, D: int) -> int:
    """Candidates kept by the fast pass of the "cpu", "torch" and "faiss" backends: C = k + extra,
    the margin growing with D (the fp32 rounding error grows with D). Same rule as csrc/cpu/knn.cpp."""
    extra = 8 * (1 + (D >= 128) + (D >= 384) + (D >= 768))
    if D >= 256:
        extra += k
    return k + extra


def _gamma(n: float, u: float) -> float:
    return n * u / (1.0 - n * u)


def _bound(A: torch.Tensor, B: torch.Tensor, steps: float, u_dot: float) -> torch.Tensor:
    """Rigorous bound of |(||a||^2 + r) - ||q - k||^2| for r = fl(||b||^2 - 2 a.b) computed with fp32
    operands (unit roundoff u_dot for the products, u = 2^-24 for the rest) by any summation
    order of ``steps`` roundings; A = ||a|| per query, B = max ||b|| (float64 tensors)."""
    u = _U32
    g = _gamma(steps, u) + 2.0 * u_dot if u_dot > u else _gamma(steps, u)
    D = max(steps, 1.0)
    e_r = B * B * (2.0 * u + D * 2.0 ** -52 + 2 * u * u) + 2.0 * (g + 2 * u) * A * B * (1 + g)
    AB = (A + B) / (1.0 - _EPS_C)
    e_c = (2.0 * _EPS_C + _EPS_C ** 2) * AB * AB
    return 1.01 * (e_r + e_c) + 1e-36


def _matmul_unit(device: torch.device) -> float:
    """Unit roundoff to assume for the products of an fp32 matmul on ``device``: torch may run
    fp32 matmuls in TF32 (CUDA) or bf16 (oneDNN on CPU) when the precision is lowered."""
    prec = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        try:
            tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        except Exception:  # pragma: no cover - API changes
            tf32 = True
        if prec == "medium":
            return _U_BF16
        if tf32 or prec == "high":
            return _U_TF32
        return _U32
    if prec == "medium":
        return _U_BF16
    if prec == "high":
        return _U_TF32
    return _U32


def _chunk(rows: int, per_row: int, device: torch.device, scale: int = 1) -> int:
    limit = _CHUNK_ELEMS.get(device.type, 1 << 22) // scale
    return max(1, min(rows, limit // max(1, per_row)))


# ---------------------------------------------------------------------------------------------
# shared pieces of the torch and faiss paths
# ---------------------------------------------------------------------------------------------
def _centre(query: torch.Tensor, key: torch.Tensor):
    """Centred fp32 copies (key mean in float64) and float64 squared norms of the centred rows."""
    mu = key.to(torch.float64).mean(dim=1, keepdim=True)               # [B, 1, D]
    a = (query.to(torch.float64) - mu).to(torch.float32)              # [B, N, D]
    b = (key.to(torch.float64) - mu).to(torch.float32)                # [B, M, D]
    nq = a.to(torch.float64).pow(2).sum(-1)                           # [B, N]
    nk = b.to(torch.float64).pow(2).sum(-1)                           # [B, M]
    return a, b, nq, nk


def _exact_d2(query: torch.Tensor, key: torch.Tensor, bidx: torch.Tensor, cand: torch.Tensor,
              n0: int, n1: int) -> torch.Tensor:
    """float64 direct-difference squared distances of queries n0:n1 to their candidates
    cand [B, n, C] (indices into key's dim 1)."""
    q = query[:, n0:n1].to(torch.float64)                            # [B, n, D]
    kg = key[bidx, cand].to(torch.float64)                            # [B, n, C, D]
    return (q[:, :, None, :] - kg).pow(2).sum(-1)


def _rerank(query, key, cand, k):
    """Exact top k of the candidates cand [B, N, C]: (d float64 [B, N, k], idx [B, N, k]) sorted by
    (distance, index)."""
    B, N, C = cand.shape
    D = query.shape[2]
    out_d = torch.empty(B, N, k, dtype=torch.float64, device=query.device)
    out_i = torch.empty(B, N, k, dtype=torch.int64, device=query.device)
    bidx = torch.arange(B, device=query.device)[:, None, None]
    step = _chunk(N, B * C * D, query.device, scale=2)  # float64
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        ci, _ = torch.sort(cand[:, n0:n1], dim=-1)                    # index order, then stable by d
        d = _exact_d2(query, key, bidx, ci, n0, n1)
        d, o = torch.sort(d, dim=-1, stable=True)
        out_d[:, n0:n1] = d[..., :k]
        out_i[:, n0:n1] = ci.gather(-1, o[..., :k])
    return out_d, out_i


def _brute_force_rows(query: torch.Tensor, key: torch.Tensor, k: int):
    """Exact (float64 direct differences, lexicographic (d, index)) top k of query [n, D] against
    key [M, D]; memory bounded by chunking over both."""
    n, D = query.shape
    M = key.shape[0]
    q = query.to(torch.float64)
    kk = key.to(torch.float64)
    out_d = torch.empty(n, k, dtype=torch.float64, device=query.device)
    out_i = torch.empty(n, k, dtype=torch.int64, device=query.device)
    mstep = max(k, min(M, 4096 if query.device.type == "cpu" else 65536))
    qstep = _chunk(n, mstep * D, query.device, scale=2)
    for s in range(0, n, qstep):
        e = min(n, s + qstep)
        run_d = run_i = None
        for m0 in range(0, M, mstep):
            m1 = min(M, m0 + mstep)
            d = (q[s:e, None, :] - kk[None, m0:m1, :]).pow(2).sum(-1)   # [n, m]
            i = torch.arange(m0, m1, device=query.device).expand(e - s, m1 - m0)
            if run_d is not None:   # earlier keys first: a stable sort keeps (d, index) order
                d = torch.cat([run_d, d], dim=1)
                i = torch.cat([run_i, i], dim=1)
            d, o = torch.sort(d, dim=1, stable=True)
            run_d, run_i = d[:, :k], i.gather(1, o[:, :k])
        out_d[s:e], out_i[s:e] = run_d, run_i
    return out_d, out_i


def _brute_force(query: torch.Tensor, key: torch.Tensor, k: int):
    d = torch.empty(*query.shape[:2], k, dtype=torch.float64, device=query.device)
    i = torch.empty(*query.shape[:2], k, dtype=torch.int64, device=query.device)
    for b in range(query.shape[0]):
        d[b], i[b] = _brute_force_rows(query[b], key[b], k)
    return d, i


def _topc(a: torch.Tensor, b: torch.Tensor, nk: torch.Tensor, C: int):
    """Running top-C of r = nk - 2 a.b (a [B, N, D], b [B, M, D], nk [B, M], one float dtype),
    chunked over N and M (never an N x M matrix). Returns (cand int64 [B, N, C], T [B, N]: the
    C-th smallest r; every key outside cand has r >= T)."""
    B, N, _ = a.shape
    M = b.shape[1]
    mstep = max(C, min(M, 8192 if a.device.type == "cpu" else 65536))
    nstep = _chunk(N, B * (mstep + C), a.device)
    cand = torch.empty(B, N, C, dtype=torch.int64, device=a.device)
    T = torch.empty(B, N, dtype=a.dtype, device=a.device)
    for n0 in range(0, N, nstep):
        n1 = min(N, n0 + nstep)
        run_v = run_i = None
        for m0 in range(0, M, mstep):
            m1 = min(M, m0 + mstep)
            r = torch.baddbmm(nk[:, None, m0:m1], a[:, n0:n1], b[:, m0:m1].transpose(1, 2), alpha=-2.0)
            i = torch.arange(m0, m1, device=a.device).expand_as(r)
            if run_v is not None:
                r = torch.cat([run_v, r], dim=2)
                i = torch.cat([run_i, i], dim=2)
            v, o = torch.topk(r, C, dim=2, largest=False, sorted=False)
            run_v, run_i = v, i.gather(2, o)
        cand[:, n0:n1] = run_i
        T[:, n0:n1] = run_v.max(dim=2).values
    return cand, T


def _certified(nq, T, delta, Dk, D):
    """||a||^2 + T - delta > Dk, with a margin for the float64 rounding of nq, Dk (D-term sums) and
    of the comparison itself."""
    T = T.to(torch.float64)
    slop = (D + 8) * 2.0 ** -52 * (nq + T.abs() + delta + Dk)
    return nq + T - delta - slop > Dk


def _settle(query, key, k, d, i, failed):
    """Exact results for the rows flagged in failed [B, N] (bool): a second candidate pass in
    float64 (centred expansion; its rounding bound is ~1e-16 relative, so it certifies all but
    exact or near-exact ties), then float64 brute force for what is left."""
    if not bool(failed.any()):
        return
    D = query.shape[2]
    M = key.shape[1]
    C = n_candidates(k, D)
    for b in torch.nonzero(failed.any(dim=1)).flatten().tolist():
        rows = torch.nonzero(failed[b]).flatten()
        kb = key[b].to(torch.float64)
        if C < M:
            mu = kb.mean(dim=0)
            a64 = (query[b, rows].to(torch.float64) - mu)[None]        # [1, n, D]
            b64 = (kb - mu)[None]                                     # [1, M, D]
            nq = a64.pow(2).sum(-1)
            nk = b64.pow(2).sum(-1)
            cand, T = _topc(a64, b64, nk, C)
            dr, ir = _rerank(query[b:b + 1, rows], key[b:b + 1], cand, k)
            u = _U64
            A, Bn = nq.sqrt(), nk.max().sqrt()
            e_r = Bn * Bn * (D + 4) * 2.0 ** -52 + 2 * (_gamma(D + 2, u) + 2 * u) * A * Bn * (1 + 1e-6)
            e_c = 4.0 * 2.0 ** -52 * (A + Bn) ** 2
            ok = _certified(nq, T, 1.01 * (e_r + e_c) + 1e-300, dr[..., k - 1], D)[0]
            d[b, rows[ok]], i[b, rows[ok]] = dr[0, ok], ir[0, ok]
            rows = rows[~ok]
        if rows.numel():
            d[b, rows], i[b, rows] = _brute_force_rows(query[b, rows], key[b], k)


def _out_dtype(query: torch.Tensor) -> torch.dtype:
    return torch.float64 if query.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# backends: impl(query [B, N, D], key [B, M, D], k) -> (dist2 [B, N, k], index int64 [B, N, k]);
# inputs finite, same dtype, validated by knn(); dist2 float64 for float64 inputs, else float32
# ---------------------------------------------------------------------------------------------
@_dispatch.register("knn", "torch")
def knn_torch(query: torch.Tensor, key: torch.Tensor, k: int):
    """Exact kNN in plain torch: centred fp32 expansion (chunked baddbmm, running topk) for C
    candidates, float64 re-rank, certificate; uncertified queries get a float64 candidate pass,
    then chunked brute force (ties)."""
    B, N, D = query.shape
    M = key.shape[1]
    out = _out_dtype(query)
    C = n_candidates(k, D)
    if C >= M:
        d, i = _brute_force(query, key, k)
        return d.to(out), i
    a, b, nq, nk = _centre(query, key)
    Bn = nk.max(dim=1).values.sqrt()                                  # [B]
    A = nq.sqrt()                                                     # [B, N]
    if not bool(((A.max() + Bn.max()) ** 2) < 1e36):                  # fp32 could overflow
        d, i = _brute_force(query, key, k)
        return d.to(out), i
    cand, T = _topc(a, b, nk.to(torch.float32), C)
    d, i = _rerank(query, key, cand, k)
    # certificate: every non-candidate has d >= ||a||^2 + T - delta
    delta = _bound(A, Bn[:, None], float(D) + 2.0, _matmul_unit(query.device))
    failed = ~_certified(nq, T, delta, d[..., k - 1], D)
    _settle(query, key, k, d, i, failed)
    return d.to(out), i


@_backend.fake("_knn_kernel")
def _(query, key, k):  # fastgen::_knn (C++ CPU / CUDA kernel): [B, N, D] x [B, M, D] -> [B, N, k] x 2
    B, N, _ = query.shape
    return (query.new_empty((B, N, k), dtype=torch.float64 if query.dtype == torch.float64 else torch.float32),
            query.new_empty((B, N, k), dtype=torch.int64))


def _knn_cpu_ok(**info) -> bool:
    return info.get("device", "cpu") == "cpu"


@_dispatch.register("knn", "cpu", auto_filter=_knn_cpu_ok)
def knn_cpu(query: torch.Tensor, key: torch.Tensor, k: int):
    """The C++ kernel (csrc/cpu/knn.cpp) on CPU tensors: float32 / float64 / float16 / bfloat16
    read directly (dist2 float64 for float64, else float32). Large single searches go through
    :func:`_pruned_search` (the same kernel on cluster-pruned key subsets; the same result)."""
    kernel = _backend.ext_op("_knn_kernel")
    query, key = query.contiguous(), key.contiguous()
    B, N, D = query.shape
    M = key.shape[1]
    if B == 1 and D >= _PRUNE_MIN_D and N * M * D >= _PRUNE_MIN_WORK and N >= 256 and M >= 16 * k:
        return _pruned_search(query, key, k, kernel)
    return kernel(query, key, k)


# ---------------------------------------------------------------------------------------------
# cluster-pruned exact search (the "cpu" backend's large searches)
# ---------------------------------------------------------------------------------------------
# Where it runs: one set (B = 1), D >= 128 and N * M * D >= 2^31 multiply-adds (below that, the
# fixed costs are not worth it; D = 64 searches are memory- rather than FMA-bound).
_PRUNE_MIN_D = 128
_PRUNE_MIN_WORK = 1 << 31
# group searches above this many multiply-adds run in the calling thread (the kernel's own
# OpenMP team); below it the kernel uses one thread, and the pool runs them side by side
_PRUNE_POOL_MAX_WORK = 1 << 26

_POOLS: dict = {}  # (pid, workers) -> executor: the kernel keeps a per-thread workspace, so threads persist
_POOLS_LOCK = threading.Lock()


def _pool(n: int):
    """A process-wide thread pool of n workers (a new one after a fork)."""
    with _POOLS_LOCK:
        key = (os.getpid(), n)
        if key not in _POOLS:
            _POOLS[key] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="fastgen-knn")
        return _POOLS[key]


def _pruned_search(query, key, k, kernel):
    """Exact kNN of query [1, N, D] in key [1, M, D] by ``kernel`` (the exact C++ search) on
    cluster-pruned key subsets: the result is the kernel's on the full key set, index for index.

    Triangle-inequality pruning over a partition of the keys (as in exact IVF / ball-tree search):
    G ~ sqrt(M) pivots p_g (farthest-first traversal of a strided sample of the keys: well
    separated clusters each get one before any gets two), every key in the group of its nearest
    pivot, r_g >= max ||k - p_g|| over the group. A query's k-th neighbour distance is at most
    U = ||q - p_o|| + r_o for its nearest pivot's group o (when that holds >= k keys), and a key of
    any group h is at least LB_h = ||q - p_h|| - r_h away: groups with LB_h > U hold no key of the
    top k, not even a tie. So each query's answer is the exact search of the union of the groups
    with LB_h <= U (one search per nearest-pivot group, keys kept in index order so that the
    kernel's lowest-index tie rule is the global one). The bounds are rigorous: r_g from the
    assignment's fp32 matmul plus its error bound (D + 2) u (||k - s|| + ||p||)^2 (u of torch's fp32
    matmul precision setting) plus the fp32 centring error 2^-23 max ||k - s|| (s: the shift);
    ||q - p_h|| from a float64 expansion, +-1e-9 of the squared norms. NaN / inf input, fp32
    overflow and data without cluster structure (the sample's covering radius above a quarter of
    its spread: pruning would save nothing) go straight to the kernel on all keys."""
    q, kk = query[0], key[0]
    N, D = q.shape
    M = kk.shape[0]
    f64 = torch.float64
    G = int(min(256, max(16, round(math.sqrt(M)))))
    step = max(1, M // (4 * G))
    s = kk[::step].to(f64).mean(0).to(torch.float32)   # the shift: any point (a sample mean)
    samp = kk[::step].float() - s
    ns = samp.pow(2).sum(1)
    gram = torch.addmm(ns[:, None] + ns[None, :], samp, samp.T, alpha=-2.0)  # squared distances
    pick = [0]
    dmin = gram[0].clone()
    spread = float(dmin.max())  # the first pick's distance (squared)
    for _ in range(min(G, samp.shape[0]) - 1):
        j = int(dmin.argmax())
        pick.append(j)
        torch.minimum(dmin, gram[j], out=dmin)
    cover = float(dmin.max())
    if not (math.isfinite(cover) and len(pick) > 1 and cover < 0.0625 * spread):  # radius < spread / 4
        return kernel(query, key, k)
    cent = samp[pick]
    G = cent.shape[0]
    # centred fp32 keys, |error| <= (2^-24 + 2^-53) |k - s| per coordinate (float64 keys are
    # centred in double first: rounding them to fp32 before the subtraction would not be)
    kc = (kk - s.to(f64)).float() if kk.dtype == f64 else kk.float() - s
    nk = torch.linalg.vector_norm(kc, dim=1)
    nk_max = float(nk.max())
    q64 = q.to(f64) - s.to(f64)
    nq = q64.pow(2).sum(1, keepdim=True)
    if not (math.isfinite(nk_max) and bool(torch.isfinite(nq).all())):
        return kernel(query, key, k)  # NaN / inf input (the kernel raises) or fp32 overflow
    # every key to its nearest pivot; r^2 = ||kc||^2 + (||p||^2 - 2 kc.p) from the same fp32 matmul,
    # with |error| <= gamma (||kc|| + ||p||)^2
    nc32 = (cent * cent).sum(1)
    best, glab = torch.addmm(nc32, kc, cent.T, alpha=-2.0).min(1)
    grow = 1 + (D + 2) * _U32 + 1e-6  # (the fp32 norm's own rounding error)
    nk, nk_max = nk.to(f64) * grow, nk_max * grow
    gam = (D + 2) * _matmul_unit(kc.device) + 4 * _U32
    r2 = nk * nk + best.to(f64) + gam * (nk + nc32.to(f64).sqrt()[glab]) ** 2
    rad = torch.zeros(G, dtype=f64).scatter_reduce_(0, glab, r2.clamp_min(0).sqrt(), "amax")
    rad = rad * (1 + 1e-6) + nk_max * 2.0 ** -23 + 1e-30
    count = torch.bincount(glab, minlength=G)
    kperm = torch.argsort(glab, stable=True)
    kst = [0] + count.cumsum(0).tolist()
    # ||q - (s + p_h)|| from below and above, every query x every pivot
    c64 = cent.to(f64)
    nc = c64.pow(2).sum(1)
    dq2 = torch.addmm(nq + nc, q64, c64.T, alpha=-2.0)
    slack = 1e-9 * (nq + nc)
    dq_lo = (dq2 - slack).clamp_min(0).sqrt() * (1 - 1e-9)
    own = dq2.argmin(1)
    rows_all = torch.arange(N)
    u = (dq2[rows_all, own] + slack[rows_all, own]).sqrt() * (1 + 1e-9) + rad[own]
    u = torch.where(count[own] >= k, u, torch.full_like(u, float("inf")))
    need = (dq_lo - rad) <= u[:, None]
    need[:, count == 0] = False
    need[rows_all, own] = True
    qperm = torch.argsort(own, stable=True)
    qcount = torch.bincount(own, minlength=G)
    # per query group (same nearest pivot): the union of the groups its queries need
    unions = torch.zeros(G, G, dtype=torch.int32).index_add_(0, own, need.to(torch.int32)) > 0
    ukeys = (unions.to(torch.int64) * count).sum(1)                     # keys to search per query group
    bigs = (ukeys * 2 > M) & (qcount > 0)
    if int(qcount[bigs].sum()) * 2 > N:
        return kernel(query, key, k)
    jobs, big_jobs, full = [], [], []
    qstart = [0] + qcount.cumsum(0).tolist()
    for g in (qcount > 0).nonzero().flatten().tolist():
        rows = qperm[qstart[g]:qstart[g + 1]]
        if bool(bigs[g]):
            full.append(rows)
        else:
            job = (rows, unions[g].nonzero().flatten().tolist())
            (big_jobs if rows.numel() * int(ukeys[g]) * D > _PRUNE_POOL_MAX_WORK else jobs).append(job)
    out_dt = f64 if q.dtype == f64 else torch.float32
    dist = torch.empty((1, N, k), dtype=out_dt)  # (returned as is: no view of a hidden buffer)
    idx = torch.empty((1, N, k), dtype=torch.int64)

    def search(job):
        rows, groups = job
        keys = torch.cat([kperm[kst[h]:kst[h + 1]] for h in groups])
        if len(groups) > 1:
            keys = keys.sort().values  # index order: the kernel's ties go to the lowest index
        d, i = kernel(q[rows][None], kk[keys][None], k)
        return rows, d[0], keys[i[0]]

    # small searches (one thread each in the kernel) side by side: the kernel releases the GIL; with
    # one torch thread no pool (its threads would not inherit the setting)
    nt = torch.get_num_threads()
    done = _pool(nt).map(search, jobs) if nt > 1 and len(jobs) > 1 else map(search, jobs)
    for rows, d, i in itertools.chain(done, map(search, big_jobs)):
        dist[0, rows], idx[0, rows] = d, i
    if full:  # rows that need most of the keys: one search of every key
        rows = torch.cat(full)
        d, i = kernel(q[rows][None], kk[None], k)
        dist[0, rows], idx[0, rows] = d[0], i[0]
    return dist, idx


# "cuda": the CUDA kernel of csrc/cuda/knn.cu (fastgen._C_cuda). Crossovers against "triton" and
# "faiss" are UNMEASURED (no GPU when it was written): "auto" takes it where it is safest, for
# batched 3-D searches (conditional IMLE: B independent sets, one launch) with few keys per set,
# and otherwise only when Triton is unavailable. (The coarse order of fastgen._dispatch.ORDER
# decides whether it is tried before or after "triton".)
_CUDA_SMALL_M = 4096


def _knn_cuda_ok(**info) -> bool:
    if info.get("device", "cpu") != "cuda":
        return False
    if info.get("dtype") == torch.float64 or info.get("k", 1) > 64:
        return False
    if info.get("B", 1) > 1 and info.get("M", 0) <= _CUDA_SMALL_M:
        return True
    return _dispatch.unavailable_reason("knn", "triton", "cuda") is not None


@_dispatch.register("knn", "cuda", auto_filter=_knn_cuda_ok)
def knn_cuda(query: torch.Tensor, key: torch.Tensor, k: int):
    """The CUDA kernel (csrc/cuda/knn.cu) on CUDA tensors: float32 / float16 / bfloat16, k <= 64.
    fp32 direct-difference distances (no expansion, no tensor cores) on shared-memory tiles with
    a running top-C per query, exact re-rank of the C candidates in double, rigorous certificate
    (relative bound gamma_{D+2}), double brute force for the queries it cannot certify; B sets in
    one launch. float64 inputs raise TypeError and k > 64 ValueError (use "torch" or "triton")."""
    return _backend.ext_op("_knn_kernel")(query.contiguous(), key.contiguous(), k)


_GPU_RES = {}


def _faiss_gpu_resources(device: torch.device):
    import faiss

    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _GPU_RES:
        _GPU_RES[idx] = faiss.StandardGpuResources()
    return _GPU_RES[idx], idx


def _faiss_search(a: torch.Tensor, b: torch.Tensor, C: int):
    """faiss exact-flat search of C neighbours of rows a [n, D] among b [M, D] (fp32):
    (approximate squared distances [n, C] float32, indices [n, C] int64) as torch tensors."""
    import faiss

    if a.device.type == "cuda":
        import faiss.contrib.torch_utils  # noqa: F401  (torch tensors in and out, no host copy)

        res, dev = _faiss_gpu_resources(a.device)
        dd, ii = faiss.knn_gpu(res, a.contiguous(), b.contiguous(), C, device=dev)
        return dd, ii.to(torch.int64)
    dd, ii = faiss.knn(a.contiguous().numpy(), b.contiguous().numpy(), C)
    return torch.from_numpy(dd), torch.from_numpy(ii).to(torch.int64)


def _knn_faiss_ok(**info) -> bool:
    # "auto" uses faiss only on CUDA (faiss-gpu); on CPU the C++ kernel, or torch, is preferred
    return info.get("device", "cpu") == "cuda"


@_dispatch.register("knn", "faiss", auto_filter=_knn_faiss_ok)
def knn_faiss(query: torch.Tensor, key: torch.Tensor, k: int):
    """faiss flat search made exact: centred fp32 data, C candidates from faiss, float64 re-rank,
    certificate with faiss's rounding bound (any summation order, TF32 assumed on GPU); queries
    it cannot settle get a float64 candidate pass (torch), then brute force."""
    B, N, D = query.shape
    M = key.shape[1]
    out = _out_dtype(query)
    C = n_candidates(k, D)
    gpu = query.device.type == "cuda"
    if C >= M or (gpu and C > 2048):          # faiss-gpu searches at most 2048 neighbours
        d, i = _brute_force(query, key, k)
        return d.to(out), i
    a, b, nq, nk = _centre(query, key)
    A = nq.sqrt()
    Bn = nk.max(dim=1).values.sqrt()
    if not bool(((A.max() + Bn.max()) ** 2) < 1e36):
        d, i = _brute_force(query, key, k)
        return d.to(out), i
    # faiss computes ||x||^2 + ||y||^2 - 2 <x, y> (norms and dot products in fp32, any order, TF32
    # possible on GPU), or direct differences for tiny batches: both within
    # (gamma_D + 2 u_dot + 3u) (A + B)^2; plus the centring error.
    u_dot = _U_TF32 if gpu else _U32
    g = _gamma(D + 2, _U32) + 2 * u_dot + 3 * _U32
    d = torch.empty(B, N, k, dtype=torch.float64, device=query.device)
    i = torch.empty(B, N, k, dtype=torch.int64, device=query.device)
    failed = torch.zeros(B, N, dtype=torch.bool, device=query.device)
    AB = (A + Bn[:, None]) / (1.0 - _EPS_C)
    delta = 1.01 * (g * (A + Bn[:, None]) ** 2 + (2 * _EPS_C + _EPS_C ** 2) * AB * AB) + 1e-36
    for bb in range(B):
        dd, ii = _faiss_search(a[bb], b[bb], C)
        dd, ii = dd.to(query.device), ii.to(query.device)
        dr, ir = _rerank(query[bb:bb + 1], key[bb:bb + 1], ii[None], k)
        d[bb], i[bb] = dr[0], ir[0]
        # faiss returns full distances: non-candidates have d >= T - delta (T: the C-th value)
        failed[bb] = ~_certified(torch.zeros_like(delta[bb]), dd[:, C - 1], delta[bb], dr[0, :, k - 1], D)
    _settle(query, key, k, d, i, failed)
    return d.to(out), i


# ---------------------------------------------------------------------------------------------
# the op fastgen::knn: implementation (backend chosen when it runs), fake kernel, autograd
# (differentiable backward, jvp) and vmap rule, registered once (fastgen/_compile.py)
# ---------------------------------------------------------------------------------------------
def _knn_impl(query, key, k, backend):
    """query [B, N, D], key [B, M, D] (validated by knn(), one dtype) -> (dist2 [B, N, k],
    index int64 [B, N, k]); the backend chosen by fastgen._dispatch when the op runs."""
    Bsz, N, D = query.shape
    M = key.shape[1]
    info = dict(B=Bsz, N=N, M=M, D=D, k=k, dtype=query.dtype, device=query.device.type)
    choice = _dispatch.select("knn", backend, query.device.type, **info)
    # (a fallback under "auto" only leaves triton / cuda, whose inputs this has checked)
    check = _check_finite_inputs(choice[0], query, key)
    d, i = _dispatch.run("knn", (query, key, k), backend=backend, device_type=query.device.type, choice=choice,
                         **info)
    return _own(_poison(d, check)), _own(i)


def _own(t):
    """t as a contiguous tensor that owns its storage: the fake kernel cannot know a backend's
    layout (triton returns row slices of padded buffers), and forward-mode AD rejects an op
    output that is a view of a hidden buffer."""
    return t.clone(memory_format=torch.contiguous_format) if t._base is not None or not t.is_contiguous() else t


def _check_finite_inputs(name, query, key):
    """ValueError naming the tensor for NaN / inf input (the C++ kernel detects them on the way).
    While a CUDA graph is being captured no host read is allowed: returns instead the device
    mask [B, N] of the queries whose result is undefined (a non-finite query row, or any
    non-finite key of its batch), for :func:`_poison`."""
    if _validate.capturing(query):
        return _validate.nonfinite_rows(query) | _validate.nonfinite_rows(key).any(-1, keepdim=True)
    if name != "cpu":
        _validate.check_finite("query", query)
        _validate.check_finite("key", key)
    return None


def _poison(dist2, bad):
    """dist2 [B, N, k] with NaN in the rows flagged by ``bad`` (CUDA-graph capture only)."""
    if bad is None:
        return dist2
    return torch.where(bad[..., None], torch.full_like(dist2, float("nan")), dist2)


def _knn_fake(query, key, k, backend):
    B, N, _ = query.shape
    return (query.new_empty((B, N, k), dtype=_out_dtype(query)), query.new_empty((B, N, k), dtype=torch.int64))


def _neighbour_diff(query, key, index):
    """q_i - key[index_ij]: [B, N, k, D] in the dtype of dist2's gradient (float64 if either input
    is float64, else float32); differentiable in query and key (gather)."""
    cd = torch.float64 if torch.float64 in (query.dtype, key.dtype) else torch.float32
    bidx = torch.arange(query.shape[0], device=query.device)[:, None, None]
    return query.to(cd)[:, :, None, :] - key.to(cd)[bidx, index], bidx


class _KnnFunction(_compile.OpFunction):
    """dist2_ij = ||q_i - key[idx_ij]||^2 with idx fixed (the argmin is piecewise constant):
    d dist2 / d q_i = 2 sum_j g_ij (q_i - key[idx_ij]); d dist2 / d key[m] = -2 sum over the
    (i, j) with idx_ij = m of g_ij (q_i - key[m]); jvp: 2 <q_i - key[idx_ij], dq_i - dkey[idx_ij]>.
    The backward is plain torch (gather, index_put), so it is itself differentiable (double
    backward, hessian) and vmappable (per-sample gradients); index is not differentiable."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        query, key, _, _ = inputs
        index = output[1]
        ctx.mark_non_differentiable(index)
        ctx.save_for_backward(query, key, index)
        ctx.save_for_forward(query, key, index)

    @staticmethod
    def backward(ctx, grad_dist2, _grad_index):
        query, key, index = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[:2]
        gq = gk = None
        if grad_dist2 is None or not (need_q or need_k):
            return None, None, None, None
        diff, bidx = _neighbour_diff(query, key, index)
        g = grad_dist2.to(diff.dtype)[..., None] * diff                        # [B, N, k, D]
        if need_q:
            gq = (2.0 * g.sum(dim=2)).to(query.dtype)
        if need_k:
            # ordered (deterministic) accumulation of -2 g into the picked key rows; out of place:
            # differentiable and vmappable (also under the vmap of is_grads_batched, which a
            # functorch-layer test cannot see), at the cost of one copy of a zero [B, M, D]
            zeros = torch.zeros(key.shape, dtype=diff.dtype, device=key.device)
            gk = zeros.index_put((bidx.expand_as(index), index), -2.0 * g, accumulate=True)
            gk = gk.to(key.dtype)
        return gq, gk, None, None

    @staticmethod
    def jvp(ctx, dq, dk, _dk, _dbackend):
        query, key, index = ctx.saved_tensors
        diff, bidx = _neighbour_diff(query, key, index)
        t = None
        if dq is not None:
            t = dq.to(diff.dtype)[:, :, None, :]
        if dk is not None:
            tk = dk.to(diff.dtype)[bidx, index]
            t = -tk if t is None else t - tk
        if t is None:
            return None, None
        return (2.0 * (diff * t).sum(-1)).to(_out_dtype(query)), None


def _knn_vmap(info, in_dims, query, key, k, backend):
    """vmap rule: one search with V folded into the query rows or the batch
    (:func:`fastgen._compile.fold_search_vmap`)."""
    return _compile.fold_search_vmap(info, in_dims, query, key, lambda q, kk: _knn_op(q, kk, k, backend))


_knn_op = _compile.define("knn", "(Tensor query, Tensor key, int k, str backend) -> (Tensor, Tensor)",
                          _knn_impl, fake=_knn_fake, autograd=_KnnFunction, vmap=_knn_vmap)


def knn(query: torch.Tensor, key: torch.Tensor, k: int = 1, *, backend: str = "auto"):
    """Exact k nearest neighbours of each query row among the key rows (squared Euclidean).

    Args:
        query: [N, D] or [B, N, D] float32 / float16 / bfloat16 / float64 tensor.
        key: [M, D] or [B, M, D] (as many dims as query, same B and D), on the same device.
        k: number of neighbours, an int with 1 <= k <= M.
        backend: "auto" | "cpu" | "torch" | "faiss" | "triton" | "cuda" (see the module doc).
            "auto" picks "cpu" for CPU tensors when fastgen._C is built, else "torch"; on CUDA
            "triton", then "cuda" (taken first-hand only for batched inputs with few keys;
            crossover unmeasured), then "faiss", then "torch". FASTGEN_BACKEND /
            fastgen._dispatch.use_backend override "auto".

    Returns:
        (dist2, index): dist2 [.., N, k] ascending squared Euclidean distances (same units as the
        inputs, squared), float32 - the exact value rounded once to fp32 - or float64 (exact to
        double rounding) for float64 inputs; index [.., N, k] int64 into key's rows. Ties go to
        the lowest key index. Neighbours are exact whatever the data's offset or clustering:
        every backend certifies its fast pass rigorously and falls back to exact search where it
        cannot (see the module doc). fp16 / bf16 inputs are computed on their exact fp32 values.

    dist2 is differentiable w.r.t. query and key (through the chosen neighbours: the gradient of
    ||q - key[index]||^2); index is not differentiable.

    Raises:
        TypeError: query / key not tensors or not floating point; k not an int; backend not a str.
        ValueError: wrong number of dims, D or batch mismatch, empty tensors, k < 1 or k > M,
            tensors on different devices, NaN or inf in query or key, unknown backend. While a
            CUDA graph is being captured the NaN / inf check cannot read the device: the rows
            whose query (or any key of their batch) is non-finite get NaN dist2 instead.
        RuntimeError: a named backend that is unavailable here (with the reason).

    PyTorch integration: eager and compiled calls alike are one custom op,
    ``torch.ops.fastgen.knn`` on [B, N, D] x [B, M, D] (2-D inputs are unsqueezed), with a fake
    kernel (``torch.compile(fullgraph=True)``, ``torch.export``), the backend chosen when it
    runs. Its autograd is registered on the op: the backward is plain torch, so double backward,
    forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``), forward-over-reverse
    (``torch.func.hessian``) work; ``torch.func.vmap`` maps the vmapped dim onto the kernel's
    batch (or query-row) dim: one search, not a loop; vmap over the backward gives per-sample
    gradients. Outputs are contiguous. Deterministic: ties go to the
    lowest index on every backend, and the key gradient is an ordered index_put.

    Source: exact search by certified re-ranking of candidates, as in FAISS's exact-flat
    refinement (Johnson, Douze & Jegou 2019) with a rigorous fp32 error bound (Higham 2002, 3.1).
    """
    _validate.check_tensor("query", query, ndims=(2, 3))
    _validate.check_tensor("key", key, ndims=(2, 3))
    if isinstance(k, bool) or not hasattr(k, "__index__"):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    k = operator.index(k)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if query.dim() != key.dim():
        raise ValueError(f"key must have as many dims as query ({query.dim()}-D), got shape {tuple(key.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same feature dim D, got query {tuple(query.shape)} "
                         f"and key {tuple(key.shape)}")
    if query.dim() == 3 and query.shape[0] != key.shape[0]:
        raise ValueError(f"query and key must have the same batch size B, got {query.shape[0]} and {key.shape[0]}")
    M = key.shape[-2]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > M:
        raise ValueError(f"k must be <= M = {M} (the number of key rows), got {k}")
    _validate.check_same_device(query=query, key=key)

    squeeze = query.dim() == 2
    q3 = query.unsqueeze(0) if squeeze else query
    k3 = key.unsqueeze(0) if squeeze else key
    if q3.dtype != k3.dtype:
        common = torch.promote_types(q3.dtype, k3.dtype)
        if common in (torch.float16, torch.bfloat16):
            common = torch.float32
        q3, k3 = q3.to(common), k3.to(common)
    dist2, index = _knn_op(q3, k3, k, backend)
    if squeeze:
        return dist2[0], index[0]
    return dist2, index
