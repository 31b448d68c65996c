"""Triton backend of :func:`fastgen.knn`: exact k nearest neighbours at tensor-core speed.

Every stage runs on the device. There is one host synchronisation (autotuning aside): the
number of queries tier 1 could not settle, read once to skip the later tiers when it is zero
(the common case for generic data) and to size tier 2's buffers by it. Tiers 3 and 4 run
over all query blocks in flagged-first order, and blocks without work return at once.

1. **Centre and round** (``_center_kernel``). The key mean ``mu`` (per batch; in float64 for
   float64 inputs) is subtracted from queries and keys: distances are shift-invariant, and
   the shift removes the cancellation of ``|q|^2 - 2 q.k + |k|^2`` for data far from the
   origin. The centred rows ``x'`` are rounded to the operand type of the candidate pass
   (TF32 for fp32 / fp64 inputs, bf16 for fp16 / bf16 inputs; round to nearest, relative
   error eps = 2^-11 or 2^-9) and written zero-padded to ``qc [B, Np, Dp]``, ``kc [B, Mp, Dp]``
   with two fp32 squared norms per row: of the rounded row ``x~`` and of ``x'``.
2. **Tier 1, candidate pass** (``_candidates_kernel``). Tiles of query x key dot products on
   tensor cores (``tl.dot``; never an N x M matrix in memory). One FMA per pair forms
   ``v_ij = (1 - alpha)|k~_j|^2 - 2 <q~_i, k~_j>``, so that ``L_ij = v_ij + (1 - alpha)|q~_i|^2
   <= |q~_i - k~_j|^2`` (alpha bounds the worst-case fp32 accumulation and the norms, see
   :func:`_error_coefficients`). A running top-C of v per query (C = next power of two >=
   k + 3) is kept in registers; a key enters when its v is below the current C-th value, so
   every key left out has ``v >= T``, the final C-th value. Small B * N with large M splits M
   across programs (grid axis 1) and merges the partial lists (``torch.topk``).
3. **Exact re-rank** (``_rerank_kernel``) of the C candidates by float64 direct differences
   of the *original* inputs, sorted by (distance, index): ties go to the lowest index.
4. **Certificate.** ``|q - k| >= |q~ - k~| - rho_q - rho_k`` with ``rho_x = (eps + 2u)|x'|``
   (the rounding of the centred rows, in the distance domain), so every excluded key has
   exact squared distance ``>= lb = (sqrt(max(T + (1 - alpha)|q~|^2, 0)) - rho_q -
   max_j rho_kj)^2``. If lb is strictly above the k-th exact distance, the query is done.
   This settles nearly every query of generic data (random, real features). It cannot settle
   clustered data whose neighbour gaps are far below eps times the data's extent (e.g. std
   1e-2 clusters around unit-scale centres): no bound in global coordinates can, whatever
   the precision of the products, because of the worst-case fp32 accumulation. Hence:
5. **Tier 2, local pass** (``_local_kernel``, :func:`_tier_local`). The unsettled queries are
   grouped by nearest pivot (P = N / 64 pivots drawn by D^2 sampling, as in k-means||
   seeding: a Voronoi cell lies inside one cluster), each group padded to blocks of 64 rows and centred on its block mean cg;
   the kernel re-centres and rounds the keys on cg on the fly, and a per-pair bound
   linearised by AM-GM, ``(1 - t) L_ij - 2 (1/t - 1) eps'^2 (|q'_i|^2 + |k'_j|^2)`` with every
   norm about cg, is ranked directly. Tight blocks give errors proportional to the cluster
   size instead of the data's extent; the candidates are re-ranked and certified as above.
6. **Tier 3** (``_scan_kernel``, TIER=3): what is still unsettled gets a top-C over all keys
   by fp32 *direct differences* (no cancellation: relative error <= (D + 4) u), float64
   re-rank, relative certificate. It fails only for ties or near-ties (below fp32
   resolution) at the k-th position beyond C - k + 1 keys, which go to
7. **Tier 4** (``_scan_kernel``, TIER=4): float64 direct differences, lexicographic
   (distance, index) top-k over all keys: exact by construction.
   Tiers 3 and 4 use CUDA cores (about 2.5 instructions per pair and coordinate in SASS), so
   they are an order of magnitude slower per query than tiers 1 and 2; their rows are sorted
   to the front first, so the cost is proportional to the rows they handle.

Output: ``dist2`` is the float64 exact value rounded to float32 (float64 for float64
inputs); ``index`` is int64. Memory is O((N + M) D) (centred copies; tier 2's grouped copy of
the unsettled queries is at most ~2x their size) plus O(N C). Inputs with |x| above ~1e18
(squares overflow fp32) are outside the supported range.

Tuning: tiers 1 and 2 are autotuned on CUDA over tile sizes, warps and stages (keyed on D,
C and coarse N, M buckets; Hopper-minded 64 / 128-row tiles for warp-group MMAs, configs
checked spill-free by ahead-of-time compilation for sm_90); a single small configuration
runs under ``TRITON_INTERPRET=1``. Private keyword arguments of :func:`knn_triton`, for
tests and tuning: ``_n_candidates`` (C, a power of two >= k), ``_split`` (number of M
splits), ``_precision`` ("tf32" | "bf16": bf16 doubles tensor-core throughput for fp32
inputs at a 4x looser bound), ``_local`` (False skips tier 2), ``_tiers`` (also return the
tier that settled each query).
"""
from __future__ import annotations

import functools
import os

import torch

try:  # triton is optional: `import fastgen` must work without it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    _HAS_TRITON = False

from .. import _dispatch

__all__ = ["knn_triton", "default_candidates"]

_U32 = 2.0 ** -24  # unit roundoff of float32 (round to nearest)
_U64 = 2.0 ** -53
# relative error of rounding a centred fp32 value to the candidate-pass operand type
# (round to nearest: half an ulp of a 10-bit / 7-bit fraction)
_EPS_OP = {"tf32": 2.0 ** -11, "bf16": 2.0 ** -9}
_ROUND_MODE = {"tf32": 1, "bf16": 2}
_MAX_C = 128
_PAD_ROWS = 128  # tier 2's grouped rows are padded to a multiple of this


def _row_granule(n: int, cap: int) -> int:
    """Rows are padded per batch to a multiple of this (a power of two in [16, cap]); every
    tile height used on them divides it, so small sets (large B, small N or M) stay small."""
    return min(cap, max(16, _next_pow2(n)))


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_d(D: int) -> int:
    if D <= 128:
        return max(16, _next_pow2(D))
    return _cdiv(D, 64) * 64


def default_candidates(k: int) -> int:
    """C, the number of candidates kept per query by tier 1: next power of two >= k + 3."""
    return min(_MAX_C, _next_pow2(k + 3))


def _error_coefficients(Dp: int) -> float:
    """alpha with |L_computed - |q~ - k~|^2| <= alpha (|q~|^2 + |k~|^2) before the alpha term.

    Products of TF32 / bf16 operands are exact in fp32. The dot's fp32 accumulation over Dp
    terms errs by at most Dp ulp-steps of the running sum, bounded by sum_d |q~_d k~_d| <=
    (|q~|^2 + |k~|^2) / 2; we allow 2^-22 per step (one bit less than a truncating fp32
    adder, as a margin for tensor cores), doubled for the factor 2 of -2 q.k. The fp32 norms
    of the rounded rows (exact squares) err by Dp u, the epilogue by a few u. Safety x1.25."""
    return 1.25 * ((Dp + 4) * 2.0 ** -22 + (Dp + 8) * _U32)


def _direct_beta(D: int) -> float:
    """Relative error bound of an fp32 sum of D squared fp32 differences (no cancellation)."""
    return 1.25 * (D + 4) * _U32


if _HAS_TRITON:

    @triton.jit
    def _center_kernel(X, MU, XC, NR2, NU2,
                       R, D, Rp, n_rblocks,
                       s_xb, s_xr, s_xd, s_mub,
                       ROUND: tl.constexpr, Dp: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """xc = round(x - mu), zero padded to [Rp, Dp]; nr2 = |xc|^2 (rounded rows), nu2 =
        |x - mu|^2 (unrounded centred rows), both in fp32."""
        pid = tl.program_id(0)
        b = pid // n_rblocks
        rb = pid % n_rblocks
        b64 = b.to(tl.int64)
        rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
        rmask = rows < R
        rows64 = rows.to(tl.int64)
        x_base = X + b64 * s_xb + rows64[:, None] * s_xr
        c_base = XC + (b64 * Rp + rows64[:, None]) * Dp
        acc_u = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc_r = tl.zeros([BLOCK_R], dtype=tl.float32)
        for d0 in range(0, Dp, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            dm = d < D
            m2 = rmask[:, None] & dm[None, :]
            x = tl.load(x_base + d[None, :].to(tl.int64) * s_xd, mask=m2, other=0.0)
            mu = tl.load(MU + b64 * s_mub + d, mask=dm, other=0.0)  # fp64 for fp64 inputs
            xc = tl.where(m2, x.to(MU.dtype.element_ty) - mu[None, :], 0.0).to(tl.float32)
            acc_u += tl.sum(xc * xc, axis=1)
            if ROUND == 1:  # to TF32 (10-bit fraction), round half away from zero
                bits = xc.to(tl.int32, bitcast=True)
                xc = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
            elif ROUND == 2:  # to bf16 (7-bit fraction), round half to even
                bits = xc.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
                xc = bits.to(tl.float32, bitcast=True)
            acc_r += tl.sum(xc * xc, axis=1)
            tl.store(c_base + d[None, :], xc.to(XC.dtype.element_ty))
        tl.store(NR2 + b64 * Rp + rows, acc_r)
        tl.store(NU2 + b64 * Rp + rows, acc_u)

    @triton.jit
    def _insert_tile(v, vals, idxs, T, m0, cols_m, cols_c, BLOCK_M: tl.constexpr):
        """Merge the tile v [BN, BM] (keys m0 + cols_m) into the running top-C (vals, idxs) of
        each row; T = max(vals). Entries are inserted, smallest first, while some row has one
        below its current C-th value; every key left out has v >= the final T."""
        tmin = tl.min(v, axis=1)
        need = tl.max((tmin < T).to(tl.int32), axis=0)
        while need > 0:
            x = tl.min(v, axis=1)
            xi = tl.min(tl.where(v == x[:, None], cols_m[None, :], BLOCK_M), axis=1)
            ins = x < T
            _tm, p = tl.max(vals, axis=1, return_indices=True)
            sel = ins[:, None] & (cols_c[None, :] == p[:, None])
            vals = tl.where(sel, x[:, None], vals)
            idxs = tl.where(sel, (m0 + xi)[:, None], idxs)
            v = tl.where(cols_m[None, :] == xi[:, None], float("inf"), v)
            T = tl.max(vals, axis=1)
            tmin = tl.min(v, axis=1)
            need = tl.max((tmin < T).to(tl.int32), axis=0)
        return vals, idxs, T

    @triton.jit
    def _candidates_kernel(QC, KC, KCOL, OUT_V, OUT_I,
                           M, N, m_chunk, Np, Mp, S_OS, S_OB,
                           NB, MB,  # coarse size buckets: autotune key only
                           Dp: tl.constexpr, C: tl.constexpr, DOT_PREC: tl.constexpr,
                           Q_RESIDENT: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Tier 1: running top-C of v_ij = kcol_j - 2 <qc_i, kc_j> over the keys
        [s * m_chunk, min(M, (s + 1) * m_chunk)) of split s = program_id(1)."""
        pid = tl.program_id(0)
        s = tl.program_id(1)
        n_qblocks = tl.cdiv(N, BLOCK_N)
        b = pid // n_qblocks
        qb = pid % n_qblocks
        b64 = b.to(tl.int64)
        offs_n = qb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        cols_m = tl.arange(0, BLOCK_M)
        cols_c = tl.arange(0, C)
        q_ptrs = QC + (b64 * Np + offs_n.to(tl.int64)[:, None]) * Dp + offs_d[None, :]
        m_start = s * m_chunk
        m_end = tl.minimum(m_start + m_chunk, M)
        k_base = KC + b64 * Mp * Dp
        if Q_RESIDENT:
            # the key loop holds a data-dependent while loop, so Triton does not software-
            # pipeline it: prefetch the next key tile into registers by hand instead
            q = tl.load(q_ptrs)
            m_last = m_start + ((m_end - m_start - 1) // BLOCK_M) * BLOCK_M
            kt_next = tl.load(k_base + (m_start + cols_m).to(tl.int64)[:, None] * Dp + offs_d[None, :])
            kcol_next = tl.load(KCOL + b64 * Mp + m_start + cols_m)
        vals = tl.full([BLOCK_N, C], float("inf"), tl.float32)
        idxs = tl.full([BLOCK_N, C], -1, tl.int32)
        T = tl.full([BLOCK_N], float("inf"), tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + cols_m
            if Q_RESIDENT:
                kt = kt_next
                kcol = kcol_next
                m_nx = tl.minimum(m0 + BLOCK_M, m_last)  # the last tile re-reads itself
                kt_next = tl.load(k_base + (m_nx + cols_m).to(tl.int64)[:, None] * Dp + offs_d[None, :])
                kcol_next = tl.load(KCOL + b64 * Mp + m_nx + cols_m)
                acc = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC, out_dtype=tl.float32)
            else:
                k_ptrs = k_base + offs_m.to(tl.int64)[:, None] * Dp + offs_d[None, :]
                kcol = tl.load(KCOL + b64 * Mp + offs_m)  # +inf on padded keys
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                qp = q_ptrs
                for _d0 in range(0, Dp, BLOCK_D):
                    a = tl.load(qp)
                    kt = tl.load(k_ptrs)
                    acc = tl.dot(a, tl.trans(kt), acc, input_precision=DOT_PREC, out_dtype=tl.float32)
                    qp += BLOCK_D
                    k_ptrs += BLOCK_D
            v = kcol[None, :] - 2.0 * acc  # kcol = +inf on padded keys
            vals, idxs, T = _insert_tile(v, vals, idxs, T, m0, cols_m, cols_c, BLOCK_M)
        o = s.to(tl.int64) * S_OS + b64 * S_OB + offs_n.to(tl.int64)[:, None] * C + cols_c[None, :]
        tl.store(OUT_V + o, vals)
        tl.store(OUT_I + o, idxs)

    @triton.jit
    def _local_kernel(QL, ROWS, CG, TB, K, OUT_V, OUT_I,
                      M, D, R, s_kb, s_km, s_kd, alpha1,
                      NB, MB,  # autotune key only
                      Dp: tl.constexpr, C: tl.constexpr, ROUND: tl.constexpr, DOT_PREC: tl.constexpr,
                      CBLK: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        """Tier 2: running top-C of v_ij = w_j - 2 (1 - t) <ql_i, round(k_j - cg)> for the
        grouped rows [r0, r0 + BLOCK_N) of QL (queries re-centred on their block's centre cg and
        rounded), where w_j = (1 - t)(1 - alpha) |round(k_j - cg)|^2 - kappa_t |k_j - cg|^2 is
        formed on the fly. Blocks whose ROWS are all -1 (padding) do nothing."""
        pid = tl.program_id(0)
        n_rblocks = R // BLOCK_N
        b = pid // n_rblocks
        rb = pid % n_rblocks
        b64 = b.to(tl.int64)
        r0 = rb * BLOCK_N
        offs_r = r0 + tl.arange(0, BLOCK_N)
        rows = tl.load(ROWS + b64 * R + offs_r)
        if tl.max(rows, axis=0) >= 0:
            cblk = r0 // CBLK
            t1 = tl.load(TB + (b64 * (R // CBLK) + cblk) * 2)  # 1 - t of this block
            kap = tl.load(TB + (b64 * (R // CBLK) + cblk) * 2 + 1)  # kappa_t = 2 (1/t - 1) eps'^2
            cg_base = CG + (b64 * (R // CBLK) + cblk) * Dp
            offs_d = tl.arange(0, BLOCK_D)
            cols_m = tl.arange(0, BLOCK_M)
            cols_c = tl.arange(0, C)
            q_ptrs = QL + (b64 * R + offs_r.to(tl.int64)[:, None]) * Dp + offs_d[None, :]
            k_row0 = K + b64 * s_kb
            vals = tl.full([BLOCK_N, C], float("inf"), tl.float32)
            idxs = tl.full([BLOCK_N, C], -1, tl.int32)
            T = tl.full([BLOCK_N], float("inf"), tl.float32)
            for m0 in range(0, M, BLOCK_M):
                offs_m = m0 + cols_m
                mm = offs_m < M
                k_ptrs = k_row0 + offs_m.to(tl.int64)[:, None] * s_km
                acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
                ku2 = tl.zeros([BLOCK_M], dtype=tl.float32)
                kr2 = tl.zeros([BLOCK_M], dtype=tl.float32)
                qp = q_ptrs
                for d0 in range(0, Dp, BLOCK_D):
                    d = d0 + offs_d
                    dm = d < D
                    a = tl.load(qp)
                    km = mm[:, None] & dm[None, :]
                    kraw = tl.load(k_ptrs + d[None, :].to(tl.int64) * s_kd, mask=km, other=0.0)
                    cg = tl.load(cg_base + d)
                    kl = tl.where(km, kraw.to(CG.dtype.element_ty) - cg[None, :], 0.0).to(tl.float32)
                    ku2 += tl.sum(kl * kl, axis=1)
                    bits = kl.to(tl.int32, bitcast=True)
                    if ROUND == 1:
                        kl = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
                    else:
                        kl = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
                    kr2 += tl.sum(kl * kl, axis=1)
                    acc = tl.dot(a, tl.trans(kl.to(QL.dtype.element_ty)), acc, input_precision=DOT_PREC,
                                 out_dtype=tl.float32)
                    qp += BLOCK_D
                w = tl.where(mm, t1 * alpha1 * kr2 - kap * ku2, float("inf"))
                v = w[None, :] - (2.0 * t1) * acc
                vals, idxs, T = _insert_tile(v, vals, idxs, T, m0, cols_m, cols_c, BLOCK_M)
            o = (b64 * R + offs_r.to(tl.int64)[:, None]) * C + cols_c[None, :]
            tl.store(OUT_V + o, vals)
            tl.store(OUT_I + o, idxs)

    @triton.jit
    def _rerank_kernel(Q, K, IDX, OUT, ROWS, N, D, n_blocks,
                       s_qb, s_qn, s_qd, s_kb, s_km, s_kd, s_ib, s_in, s_ic,
                       C: tl.constexpr, HAS_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        """OUT[b, n, c] = sum_d (q[b,r,d] - k[b,idx[b,n,c],d])^2 in float64 (+inf for idx < 0),
        r = ROWS[b, n] (rows < 0 give +inf) when HAS_ROWS, else r = n."""
        pid = tl.program_id(0)
        b = pid // n_blocks
        nb = pid % n_blocks
        b64 = b.to(tl.int64)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        if HAS_ROWS:
            rows = tl.load(ROWS + b64 * N + offs_n, mask=nmask, other=-1)
            nmask = nmask & (rows >= 0)
            rows = tl.where(nmask, rows, 0)
        else:
            rows = offs_n
        cols = tl.arange(0, C)
        idx = tl.load(IDX + b64 * s_ib + offs_n.to(tl.int64)[:, None] * s_in + cols[None, :] * s_ic,
                      mask=nmask[:, None], other=-1)
        valid = (idx >= 0) & nmask[:, None]
        qp = Q + b64 * s_qb + rows.to(tl.int64) * s_qn
        kp = K + b64 * s_kb + tl.where(valid, idx, 0).to(tl.int64) * s_km
        acc = tl.zeros([BLOCK_N, C], dtype=tl.float64)
        for _d in range(0, D):
            qv = tl.load(qp, mask=nmask, other=0.0).to(tl.float64)
            kv = tl.load(kp, mask=valid, other=0.0).to(tl.float64)
            diff = qv[:, None] - kv
            acc += diff * diff
            qp += s_qd
            kp += s_kd
        acc = tl.where(valid, acc, float("inf"))
        tl.store(OUT + (b64 * N + offs_n.to(tl.int64)[:, None]) * C + cols[None, :], acc,
                 mask=(offs_n < N)[:, None])

    @triton.jit
    def _direct_tile(q_rows, qmask, k_rows, kmask, s_qd, s_kd, D,
                     ACC: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
        """[BN, BM] sums over d of (q_d - k_d)^2 in ACC precision (direct differences, no
        cancellation). Four coordinates per step, loaded as 2-D tiles and split into columns
        (about two instructions per pair and coordinate in SASS)."""
        rd = tl.arange(0, 4)
        v = tl.zeros([BN, BM], dtype=ACC)
        for d0 in range(0, D, 4):
            dd = (d0 + rd).to(tl.int64)
            dm = dd < D
            q = tl.load(q_rows[:, None] + dd[None, :] * s_qd, mask=qmask[:, None] & dm[None, :], other=0.0)
            k = tl.load(k_rows[:, None] + dd[None, :] * s_kd, mask=kmask[:, None] & dm[None, :], other=0.0)
            q01, q23 = tl.split(tl.permute(tl.reshape(q.to(ACC), [BN, 2, 2]), [0, 2, 1]))
            q0, q1 = tl.split(q01)
            q2, q3 = tl.split(q23)
            k01, k23 = tl.split(tl.permute(tl.reshape(k.to(ACC), [BM, 2, 2]), [0, 2, 1]))
            k0, k1 = tl.split(k01)
            k2, k3 = tl.split(k23)
            t = q0[:, None] - k0[None, :]
            v += t * t
            t = q1[:, None] - k1[None, :]
            v += t * t
            t = q2[:, None] - k2[None, :]
            v += t * t
            t = q3[:, None] - k3[None, :]
            v += t * t
        return v

    @triton.jit
    def _scan_kernel(Q, K, FLAG, OUT_D, OUT_I, PERM, N, M, D, k, n_blocks,
                     s_qb, s_qn, s_qd, s_kb, s_km, s_kd, s_fb, s_ob, beta, tiny,
                     TIER: tl.constexpr, ACC: tl.constexpr, KP: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """Tiers 3 and 4: brute force over all M keys by direct differences for the queries
        whose FLAG is TIER - 2 (1: tier 3, 2: tier 4). Block p handles the query rows
        PERM[b, p * BLOCK_N: (p + 1) * BLOCK_N] (PERM lists the flagged rows first), and a block
        without a flagged row does nothing.

        A running lexicographic (distance, index) top-KP is kept per query. TIER 4 (ACC =
        float64, KP >= k live slots) writes the exact top-k. TIER 3 (ACC = float32, or float64
        for float64 inputs, KP = C slots) re-ranks its C candidates in float64, writes the top-k,
        and sets FLAG to 0 when the relative bound certifies them (excluded keys: exact >=
        T (1 - beta) - tiny), else to 2."""
        pid = tl.program_id(0)
        b = pid // n_blocks
        nb = pid % n_blocks
        b64 = b.to(tl.int64)
        offs_p = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        pmask = offs_p < N
        offs_n = tl.load(PERM + b64 * N + offs_p, mask=pmask, other=0)
        nmask = pmask
        flags = tl.load(FLAG + b64 * s_fb + offs_n, mask=nmask, other=0)
        active = nmask & (flags == TIER - 2)
        if tl.max(active.to(tl.int32), axis=0) > 0:
            cols = tl.arange(0, KP)
            cols_m = tl.arange(0, BLOCK_M)
            if TIER == 4:
                live = cols[None, :] < k  # slots >= k are unused
            else:
                live = cols[None, :] >= 0
            vals = tl.full([BLOCK_N, KP], float("inf"), ACC)
            idxs = tl.zeros([BLOCK_N, KP], dtype=tl.int32) + (M + cols)[None, :]  # distinct sentinels
            q_rows = Q + b64 * s_qb + offs_n.to(tl.int64) * s_qn
            # lexicographic max (T, iT) of the live slots, and its slot p
            T = tl.max(tl.where(live, vals, -float("inf")), axis=1)
            atT = live & (vals == T[:, None])
            iT = tl.max(tl.where(atT, idxs, -1), axis=1)
            p = tl.max(tl.where(atT & (idxs == iT[:, None]), cols[None, :], -1), axis=1)
            for m0 in range(0, M, BLOCK_M):
                offs_m = m0 + cols_m
                mm = offs_m < M
                k_rows = K + b64 * s_kb + offs_m.to(tl.int64) * s_km
                v = _direct_tile(q_rows, nmask, k_rows, mm, s_qd, s_kd, D, ACC, BLOCK_N, BLOCK_M)
                v = tl.where(mm[None, :] & active[:, None], v, float("inf"))
                better = (v < T[:, None]) | ((v == T[:, None]) & (offs_m[None, :] < iT[:, None]))
                better = better & (v < float("inf"))
                need = tl.max(tl.max(better.to(tl.int32), axis=1), axis=0)
                while need > 0:
                    x, xi = tl.min(v, axis=1, return_indices=True)  # lowest index among equal values
                    j = m0 + xi
                    ins = (x < float("inf")) & ((x < T) | ((x == T) & (j < iT)))
                    sel = ins[:, None] & (cols[None, :] == p[:, None])
                    vals = tl.where(sel, x[:, None], vals)
                    idxs = tl.where(sel, j[:, None], idxs)
                    v = tl.where(cols_m[None, :] == xi[:, None], float("inf"), v)
                    T = tl.max(tl.where(live, vals, -float("inf")), axis=1)
                    atT = live & (vals == T[:, None])
                    iT = tl.max(tl.where(atT, idxs, -1), axis=1)
                    p = tl.max(tl.where(atT & (idxs == iT[:, None]), cols[None, :], -1), axis=1)
                    better = (v < T[:, None]) | ((v == T[:, None]) & (offs_m[None, :] < iT[:, None]))
                    better = better & (v < float("inf"))
                    need = tl.max(tl.max(better.to(tl.int32), axis=1), axis=0)
            if TIER == 3:
                # exact float64 re-rank of the KP candidates (sentinel slots -> +inf)
                valid = idxs < M
                krow = tl.where(valid, idxs, 0).to(tl.int64)
                qp = q_rows
                kp = K + b64 * s_kb + krow * s_km
                ex = tl.zeros([BLOCK_N, KP], dtype=tl.float64)
                for _d in range(0, D):
                    qv = tl.load(qp, mask=nmask, other=0.0).to(tl.float64)
                    kv = tl.load(kp, mask=valid, other=0.0).to(tl.float64)
                    diff = qv[:, None] - kv
                    ex += diff * diff
                    qp += s_qd
                    kp += s_kd
                ex = tl.where(valid, ex, float("inf"))
                t_c = tl.max(vals, axis=1).to(tl.float64)  # the C-th fp32 value (+inf: all keys kept)
            else:
                ex = vals.to(tl.float64)
            # emit k results in (distance, index) order
            o_base = b64 * s_ob + offs_n.to(tl.int64) * k
            big = M + KP
            alive = tl.broadcast_to(live, [BLOCK_N, KP])
            ek = tl.zeros([BLOCK_N], dtype=tl.float64)
            for c in range(0, k):
                x = tl.min(tl.where(alive, ex, float("inf")), axis=1)
                atx = alive & (ex == x[:, None])
                ix = tl.min(tl.where(atx, idxs, big), axis=1)
                tl.store(OUT_D + o_base + c, x, mask=active)
                tl.store(OUT_I + o_base + c, ix.to(tl.int64), mask=active)
                alive = alive & ~(atx & (idxs == ix[:, None]))
                ek = x
            if TIER == 3:
                lb = t_c * (1.0 - beta) - tiny
                ok = lb > ek * (1.0 + (D + 8) * 2.220446049250313e-16)
                tl.store(FLAG + b64 * s_fb + offs_n, tl.where(ok, 0, 2).to(tl.int32), mask=active)


# ----------------------------------------------------------------------------------------
# configurations


def _cand_configs(Dp: int, C: int, elt_bytes: int) -> list:
    """Autotune space of the tier-1 candidate pass for padded dimension Dp (CUDA, Hopper-minded:
    128-row tiles map onto warp-group MMAs; configs whose shared memory exceeds ~220 KB or whose
    running top-C would not fit in registers are left out)."""
    max_bn = 128 if C <= 16 else (64 if C <= 32 else 32)
    out = []
    if Dp <= 128:  # the query tile stays resident across key tiles (no D loop)
        tiles = [(128, 128, 8), (128, 64, 4), (64, 128, 4), (64, 64, 4), (32, 64, 4), (16, 64, 4)]
        for bn, bm, w in tiles:
            if bn > max_bn or (bn + bm) * Dp * elt_bytes > 220 * 1024:
                continue
            for st in (2, 3):  # stages only matter for the loads Triton can pipeline here
                out.append(triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=Dp, Q_RESIDENT=True),
                                         num_warps=w, num_stages=st))
    else:  # (BLOCK_N, BLOCK_M, warps, BLOCK_D in 4-byte units, stages); 16-bit data doubles BLOCK_D
        plan = [(128, 256, 8, 32, 3), (128, 256, 8, 32, 4), (128, 128, 8, 32, 3), (128, 128, 8, 32, 4),
                (128, 128, 8, 64, 3), (128, 64, 4, 32, 4), (128, 64, 4, 64, 3), (64, 128, 4, 32, 4),
                (64, 128, 4, 64, 3), (64, 64, 4, 64, 3), (32, 64, 4, 64, 3)]
        for bn, bm, w, bd, st in plan:
            bd = bd * 4 // elt_bytes
            if bn > max_bn or (bm == 256 and C > 8) or Dp % bd or st * (bn + bm) * bd * elt_bytes > 220 * 1024:
                continue
            out.append(triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd, Q_RESIDENT=False),
                                     num_warps=w, num_stages=st))
    return out


def _interp_config(Dp: int, C: int, gN: int = 128, gM: int = 256) -> dict:
    """The single configuration used under TRITON_INTERPRET=1 (large blocks: fewer programs)."""
    bd = Dp if Dp <= 64 else 64
    return dict(BLOCK_N=min(gN, 64 if C <= 32 else 16), BLOCK_M=min(gM, 64), BLOCK_D=bd, Q_RESIDENT=(bd >= Dp))


@functools.lru_cache(maxsize=None)
def _cand_tuner(Dp: int, C: int, elt_bytes: int, gN: int = 128, gM: int = 256):
    """Autotuner of the tier-1 kernel over the configs whose tiles fit the row granules."""
    cfgs = [c for c in _cand_configs(Dp, C, elt_bytes) if c.kwargs["BLOCK_N"] <= gN and c.kwargs["BLOCK_M"] <= gM]
    if not cfgs:  # tiny sets: one small tile
        bd = Dp if Dp <= 128 else 32 * 4 // elt_bytes
        cfgs = [triton.Config(dict(BLOCK_N=min(gN, 32), BLOCK_M=min(gM, 64), BLOCK_D=bd, Q_RESIDENT=bd >= Dp),
                              num_warps=4, num_stages=2)]
    return triton.autotune(configs=cfgs, key=["NB", "MB"])(_candidates_kernel)


_LOCAL_BLOCK = 64  # rows of QL sharing one centre (a multiple of every local BLOCK_N)


def _local_configs(Dp: int, C: int, elt_bytes: int) -> list:
    """Autotune space of the tier-2 local pass: keys are re-centred and rounded in registers
    (no spills at these sizes on sm_90); BLOCK_N divides _LOCAL_BLOCK."""
    out = []
    plan = [(64, 64, 4, 32, 2), (64, 64, 4, 32, 3), (64, 128, 8, 32, 2), (64, 128, 8, 32, 3),
            (64, 64, 8, 64, 2), (32, 64, 4, 32, 2)]
    for bn, bm, w, bd, st in plan:  # BLOCK_D in elements for every operand type (16-bit ones
        bd = min(bd, Dp)                # with BLOCK_D = 64 spill at 64 x 128 on sm_90)
        if (C > 32 and bn > 32) or Dp % bd:
            continue
        out.append(triton.Config(dict(BLOCK_N=bn, BLOCK_M=bm, BLOCK_D=bd), num_warps=w, num_stages=st))
    return out


@functools.lru_cache(maxsize=None)
def _local_tuner(Dp: int, C: int, elt_bytes: int):
    return triton.autotune(configs=_local_configs(Dp, C, elt_bytes), key=["NB", "MB"])(_local_kernel)


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _choose_split(B: int, N: int, M: int, device: torch.device) -> int:
    """Number of M splits when B * N alone cannot fill the GPU: the smallest split that gives
    at least one program per SM with >= 85 % of the last wave busy (nominal 128-row query
    blocks; every split keeps >= 2048 keys)."""
    if device.type != "cuda":
        return 1
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    progs = B * _cdiv(N, 128)
    if progs >= 2 * sms:
        return 1
    best, best_eff = 1, 0.0
    for sp in range(1, max(1, min(256, M // 2048)) + 1):
        x = progs * sp
        eff = x / (_cdiv(x, sms) * sms)
        if x >= sms and eff >= 0.85:
            return sp
        if eff > best_eff + 1e-9:
            best, best_eff = sp, eff
    return best


# ----------------------------------------------------------------------------------------
# the registered implementation


def _center(x: torch.Tensor, mu: torch.Tensor, Rp: int, Dp: int, precision: str, buf_dtype):
    B, R, D = x.shape
    xc = torch.empty((B, Rp, Dp), dtype=buf_dtype, device=x.device)
    nr2 = torch.empty((B, Rp), dtype=torch.float32, device=x.device)
    nu2 = torch.empty((B, Rp), dtype=torch.float32, device=x.device)
    block_r = 32 if Rp % 32 == 0 else 16  # Rp is a multiple of 16
    block_d = min(Dp, 64)  # divides Dp
    n_rblocks = Rp // block_r
    _center_kernel[(B * n_rblocks,)](
        x, mu, xc, nr2, nu2, R, D, Rp, n_rblocks,
        x.stride(0), x.stride(1), x.stride(2), mu.stride(0),
        ROUND=_ROUND_MODE[precision], Dp=Dp, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return xc, nr2, nu2


def _rerank_config(C: int, interp: bool) -> dict:
    """Block size of the re-rank kernel ([BLOCK_N, C] float64 accumulators)."""
    if interp:
        return dict(BLOCK_N=max(1, min(128, 1024 // C)), num_warps=4)
    return dict(BLOCK_N=max(1, min(64, 1024 // C)), num_warps=4)


def _scan_config(tier: int, kp: int, interp: bool, fp64: bool = False) -> dict:
    """Block sizes of the tier-3 / tier-4 scans ([BLOCK_N, BLOCK_M] accumulators, KP slots;
    float64 accumulators take half the rows)."""
    if interp:
        return dict(BLOCK_N=32 if tier == 3 else 16, BLOCK_M=64, num_warps=4)
    if tier == 3 and not fp64:
        return dict(BLOCK_N=max(8, min(64, 1024 // kp)), BLOCK_M=64, num_warps=4)
    return dict(BLOCK_N=max(8, min(32, 512 // kp)), BLOCK_M=64, num_warps=4)


def _scan(tier, query, key, flags, d_out, i_out, k, C, interp):
    """Launch tier 3 (fp32 direct differences) or 4 (fp64 exact) over the rows flagged
    tier - 2, gathered first by a stable sort (no host sync)."""
    B, N, D = query.shape
    M = key.shape[1]
    fp64_in = query.dtype == torch.float64 or key.dtype == torch.float64
    if tier == 3 and not fp64_in:
        acc, kp, beta, tiny = tl.float32, C, _direct_beta(D), D * 2.0 ** -148
    elif tier == 3:  # float64 inputs: the direct differences must be taken in float64
        acc, kp, beta, tiny = tl.float64, C, 1.25 * (D + 4) * _U64, D * 2.0 ** -1073
    else:
        acc, kp, beta, tiny = tl.float64, _next_pow2(k), 0.0, 0.0
    perm = torch.sort((flags[:, :N] != tier - 2).to(torch.int8), dim=1, stable=True).indices
    cfg = _scan_config(tier, kp, interp, acc == tl.float64)
    nb = _cdiv(N, cfg["BLOCK_N"])
    _scan_kernel[(B * nb,)](query, key, flags, d_out, i_out, perm, N, M, D, k, nb,
                            query.stride(0), query.stride(1), query.stride(2),
                            key.stride(0), key.stride(1), key.stride(2),
                            flags.stride(0), d_out.stride(0),
                            beta, tiny, TIER=tier, ACC=acc, KP=kp, **cfg)


def _rerank(query, key, cand, rows=None):
    """Exact float64 squared distances [B, R, C] of the candidates cand [B, R, C] (int32, -1:
    none) of query rows ``rows`` [B, R] (default: 0..N-1), then their (distance, index) order:
    returns (sorted distances, sorted int64 indices)."""
    B, R, C = cand.shape
    D = query.shape[2]
    cand = cand.contiguous()
    exact = torch.empty((B, R, C), dtype=torch.float64, device=query.device)
    rcfg = _rerank_config(C, _interpret())
    nrb = _cdiv(R, rcfg["BLOCK_N"])
    _rerank_kernel[(B * nrb,)](query, key, cand, exact, rows if rows is not None else cand, R, D, nrb,
                               query.stride(0), query.stride(1), query.stride(2),
                               key.stride(0), key.stride(1), key.stride(2),
                               cand.stride(0), cand.stride(1), cand.stride(2),
                               C=C, HAS_ROWS=rows is not None, **rcfg)
    si, p1 = torch.sort(cand.long(), dim=-1)
    ex, p2 = torch.sort(exact.gather(-1, p1), dim=-1, stable=True)
    return ex, si.gather(-1, p2)


def _round_operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """Round fp32 x to the TF32 / bf16 grid exactly as _center_kernel does (fp32 container)."""
    bits = x.contiguous().view(torch.int32)
    if precision == "tf32":
        r = (bits + 0x1000) & -8192
    else:
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return r.view(torch.float32)


def _tier1(query, key, C, split, precision, _return_parts=False):
    """Tier 1 (module docstring, steps 1-2). Returns cv [B, N, C] fp32 candidate values v,
    ci [B, N, C] int32 candidate indices (-1: none), lb [B, N] float64, a lower bound of the
    exact squared distance of every key outside the candidate set, and the key mean mu
    [B, D]; with ``_return_parts`` (tests) qrow, rho [B, N] float64 instead of mu, such that
    ``_bound_from_v(v, qrow, rho)`` bounds each candidate's exact squared distance from below."""
    B, N, D = query.shape
    M = key.shape[1]
    device = query.device
    interp = _interpret()
    Dp = _pad_d(D)
    gN, gM = _row_granule(N, 128), _row_granule(M, 256)
    Np = _cdiv(N, gN) * gN
    Mp = _cdiv(M, gM) * gM
    buf_dtype = torch.bfloat16 if (precision == "bf16" and not interp) else torch.float32

    # 1. centre on the key mean, round to the candidate precision
    # [B, D]; float64 inputs are centred in float64 before rounding to float32
    mu = key.mean(dim=1, dtype=torch.float64 if key.dtype == torch.float64 else torch.float32)
    qc, qr2, qu2 = _center(query, mu, Np, Dp, precision, buf_dtype)
    kc, kr2, ku2 = _center(key, mu, Mp, Dp, precision, buf_dtype)
    alpha = _error_coefficients(Dp)
    kcol = kr2 * (1.0 - alpha)
    kcol[:, M:] = float("inf")  # padded keys never qualify

    # 2. tier 1: candidate pass (M split across grid axis 1 when B * N is small)
    split = split if split is not None else _choose_split(B, N, M, device)
    split = max(1, min(int(split), _cdiv(M, gM)))
    m_chunk = _cdiv(_cdiv(M, split), gM) * gM  # tiles of a chunk never pass Mp
    split = _cdiv(M, m_chunk)
    cand_v = torch.empty((split, B, Np, C), dtype=torch.float32, device=device)
    cand_i = torch.empty((split, B, Np, C), dtype=torch.int32, device=device)
    nb_key = max(0, (N - 1).bit_length() // 2)
    mb_key = max(0, (M - 1).bit_length() // 2)
    args = (qc, kc, kcol, cand_v, cand_i, M, N, m_chunk, Np, Mp, B * Np * C, Np * C, nb_key, mb_key)
    if interp:
        cfg = _interp_config(Dp, C, gN, gM)
        _candidates_kernel[(B * _cdiv(N, cfg["BLOCK_N"]), split)](*args, Dp=Dp, C=C, DOT_PREC="tf32", **cfg,
                                                                 num_warps=4)
    else:
        def grid(meta):
            return (B * _cdiv(N, meta["BLOCK_N"]), split)

        _cand_tuner(Dp, C, kc.element_size(), gN, gM)[grid](*args, Dp=Dp, C=C, DOT_PREC="tf32")
    del qc, kc
    cv = cand_v[:, :, :N]
    ci = cand_i[:, :, :N]
    if split > 1:
        cv = cv.permute(1, 2, 0, 3).reshape(B, N, split * C)
        ci = ci.permute(1, 2, 0, 3).reshape(B, N, split * C)
        cv, pos = torch.topk(cv, C, dim=-1, largest=False, sorted=False)
        ci = ci.gather(-1, pos)
    else:
        cv, ci = cv[0], ci[0]
    ci = ci.contiguous()

    # lower bound of the exact squared distance of every key outside the candidate set
    eps = _EPS_OP[precision]
    t_c = cv.max(dim=-1).values  # the C-th candidate value (+inf when all keys are in)
    rho = (eps + 2 * _U32) * 1.01 * (qu2[:, :N].double().sqrt()
                                     + ku2[:, :M].double().amax(dim=1, keepdim=True).sqrt()) + 2.0 ** -100
    qrow = qr2[:, :N].double() * (1.0 - alpha)
    lb = _bound_from_v(t_c, qrow, rho)
    if _return_parts:
        return cv, ci, lb, qrow, rho
    return cv, ci, lb, mu


def _bound_from_v(v, qrow, rho):
    """Lower bound of the exact squared distance from a tier-1 value v (any shape [B, N, ...])."""
    while qrow.dim() < v.dim():
        qrow, rho = qrow[..., None], rho[..., None]
    big_l = (v.double() + qrow).clamp_min(0.0)
    return ((big_l.sqrt() * (1 - 1e-14) - rho).clamp_min(0.0)) ** 2 * (1 - 1e-14)


def _tier_local(query, key, mu, flags, d_out, i_out, ek, k, C, precision, sub, _return_parts=False):
    """Tier 2 (module docstring): re-search the queries flagged 1 with local coordinates.

    Flagged queries are grouped by their nearest pivot (P = Nf / 64 pivots drawn by D^2
    sampling; a Voronoi cell lies in one cluster of clustered data), each group padded to whole blocks of
    _LOCAL_BLOCK rows, and every block is centred on the mean cg of its queries; the kernel
    re-centres the keys on cg on the fly. With t in (0, 1) per block, the exact squared
    distance of query i and key j is at least

        (1 - t) [ (1 - alpha)(|q~_i|^2 + |k~_j|^2) - 2 <q~_i, k~_j> ] - 2 (1/t - 1) eps'^2 (|q'_i|^2 + |k'_j|^2)

    (AM-GM on the distance-domain bound of tier 1: (a - b)^2 >= (1 - t) a^2 - (1/t - 1) b^2),
    with every norm taken about cg: small when the block is tight, whatever the data's
    extent. Certified queries get their results and flag 0; the others keep flag 1.

    ``sub`` [B, Nf]: rows of query that include every row flagged 1 (the flagged rows first,
    Nf = the largest count over the batch), so that the work scales with the flagged rows."""
    B, N, D = query.shape
    M = key.shape[1]
    device = query.device
    interp = _interpret()
    cd = torch.float64 if query.dtype == torch.float64 else torch.float32
    CB = _LOCAL_BLOCK
    Dp = _pad_d(D)
    Nf = sub.shape[1]
    active = flags.gather(1, sub) == 1

    # --- group the flagged queries by nearest pivot (any grouping is correct; tight is fast).
    # Pivots by D^2 sampling in rounds (k-means|| seeding): each round draws X more flagged
    # queries with probability proportional to their squared distance to the pivots so far,
    # so every well-separated cluster soon gets one; X doubles up to P / 16.
    P = max(1, min(4096, Nf // CB))  # groups average >= CB rows: padding at most ~2x
    qg = (query.gather(1, sub[..., None].expand(B, Nf, D)).to(cd) - mu.to(cd)[:, None, :]).to(torch.float32)
    qn = (qg * qg).sum(-1)
    mind = torch.where(active, qn, 0.0)
    lab = torch.zeros((B, Nf), dtype=torch.int64, device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    have, X = 0, 1
    while have < P:
        if have == 0:  # the flagged query farthest from the mean
            new = torch.topk(mind, 1, dim=1).indices
        else:  # X draws without replacement, P(i) ~ mind_i (exponential race; no host sync)
            race = torch.empty_like(mind).exponential_(generator=gen)
            new = torch.topk(mind.clamp_min(0.0) / race, X, dim=1).indices
        piv = qg.gather(1, new[..., None].expand(B, X, D))
        pn = (piv * piv).sum(-1)[:, None, :]
        dmin = torch.empty((B, Nf), dtype=torch.float32, device=device)
        arg = torch.empty((B, Nf), dtype=torch.int64, device=device)
        step = max(1, (1 << 25) // (X * B))
        for s0 in range(0, Nf, step):  # [B, step, X] squared distances, approximate (any is fine)
            d2 = torch.baddbmm(pn + qn[:, s0:s0 + step, None], qg[:, s0:s0 + step], piv.transpose(1, 2),
                               alpha=-2.0)
            dmin[:, s0:s0 + step], arg[:, s0:s0 + step] = d2.min(-1)
        if have == 0:
            better = torch.ones_like(active)
        else:
            better = dmin < mind
        lab = torch.where(better, arg + have, lab)
        mind = torch.where(active, torch.where(better, dmin, mind), 0.0)
        have += X
        X = min(have, P - have, max(16, P // 16))
    del qg, qn, mind
    lab = torch.where(active, lab, P)
    cnt = torch.zeros((B, P + 1), dtype=torch.int64, device=device).scatter_add_(1, lab, torch.ones_like(lab))
    padded = (cnt + CB - 1) // CB * CB
    padded[:, P] = 0
    goff = torch.cumsum(padded, 1) - padded
    start = torch.cumsum(cnt, 1) - cnt
    slab, order = torch.sort(lab, dim=1, stable=True)
    dest = goff.gather(1, slab) + torch.arange(Nf, device=device)[None] - start.gather(1, slab)
    R = _cdiv(Nf + P * CB, _PAD_ROWS) * _PAD_ROWS  # bound of the padded layout
    dest = torch.where(slab < P, dest, R)
    rows = torch.full((B, R + 1), -1, dtype=torch.int64, device=device)
    rows = rows.scatter_(1, dest, sub.gather(1, order))[:, :R]  # query row of each slot, -1: padding
    valid = rows >= 0
    rsafe = rows.clamp_min(0)

    # --- block centres, local query coordinates, per-block t
    nblk = R // CB
    qsel = query.gather(1, rsafe[..., None].expand(B, R, D)).to(cd)
    w = valid.to(cd)[..., None]
    cg = (qsel * w).view(B, nblk, CB, D).sum(2) / w.view(B, nblk, CB, 1).sum(2).clamp_min(1.0)
    ql = ((qsel - cg.repeat_interleave(CB, dim=1)) * w).to(torch.float32)
    del qsel
    qu2 = (ql * ql).sum(-1)
    qlr = _round_operand(ql, precision)
    qr2 = (qlr * qlr).sum(-1)
    buf_dtype = torch.bfloat16 if (precision == "bf16" and not interp) else torch.float32
    QL = torch.zeros((B, R, Dp), dtype=buf_dtype, device=device)
    QL[..., :D] = qlr
    del ql, qlr
    CG = torch.zeros((B, nblk, Dp), dtype=cd, device=device)
    CG[..., :D] = cg
    alpha = _error_coefficients(Dp)
    epsp = (_EPS_OP[precision] + 2 * _U32) * 1.01
    delta = ek.gather(1, rsafe).clamp_min(0.0).sqrt()  # tier-1 estimate of the k-th distance
    reach = torch.where(valid, qu2.double().sqrt() + delta, 0.0).view(B, nblk, CB).amax(-1)
    dmin = torch.where(valid, delta, float("inf")).view(B, nblk, CB).amin(-1)
    t = (2.0 * epsp * reach / dmin).nan_to_num(0.5, 0.5, 0.5).clamp(2.0 ** -20, 0.5)
    TB = torch.stack([1.0 - t, 2.0 * (1.0 / t - 1.0) * epsp * epsp], -1).to(torch.float32).contiguous()

    # --- candidate pass in local coordinates
    cand_v = torch.full((B, R, C), float("inf"), dtype=torch.float32, device=device)
    cand_i = torch.full((B, R, C), -1, dtype=torch.int32, device=device)
    rows32 = rows.to(torch.int32).contiguous()
    nb_key = max(0, (N - 1).bit_length() // 2)
    mb_key = max(0, (M - 1).bit_length() // 2)
    args = (QL, rows32, CG, TB, key, cand_v, cand_i, M, D, R)
    rest = (key.stride(0), key.stride(1), key.stride(2), 1.0 - alpha, nb_key, mb_key)
    meta = dict(Dp=Dp, C=C, ROUND=_ROUND_MODE[precision], DOT_PREC="tf32", CBLK=CB)
    if interp:
        bn = 64 if C <= 32 else 16
        _local_kernel[(B * (R // bn),)](*args, *rest, **meta, BLOCK_N=bn, BLOCK_M=64, BLOCK_D=min(Dp, 64),
                                        num_warps=4)
    else:
        def grid(m):
            return (B * (R // m["BLOCK_N"]),)

        _local_tuner(Dp, C, QL.element_size())[grid](*args, *rest, **meta)

    # --- bound of the excluded keys, exact re-rank, certificate, scatter back
    t1 = TB[..., 0].double().repeat_interleave(CB, dim=1)
    kap = TB[..., 1].double().repeat_interleave(CB, dim=1)
    rowterm = t1 * (1.0 - alpha) * qr2.double() - kap * qu2.double()
    lb = cand_v.max(-1).values.double() + rowterm
    if _return_parts:  # tests: every candidate's cand_v + rowterm bounds its exact distance
        return rows, cand_v, cand_i, rowterm, lb
    ex, si = _rerank(query, key, cand_i, rows32)
    ok = valid & (lb > ex[..., k - 1] * (1.0 + (D + 8) * 2 * _U64))
    target = torch.where(ok, rows, N)
    d_out.scatter_(1, target[..., None].expand(B, R, k), ex[..., :k])
    i_out.scatter_(1, target[..., None].expand(B, R, k), si[..., :k])
    flags.scatter_(1, target, torch.zeros_like(target, dtype=torch.int32))
    flags[:, N] = 0


def _graph_capture(device: torch.device) -> bool:
    """True while a CUDA graph is being captured on ``device``'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@_dispatch.register("knn", "triton")
def knn_triton(query: torch.Tensor, key: torch.Tensor, k: int = 1, *, _n_candidates: int | None = None,
               _split: int | None = None, _precision: str | None = None, _tiers: bool = False,
               _local: bool = True):
    """Exact k nearest neighbours with Triton kernels (see the module docstring).

    query [B, N, D] (or [N, D]), key [B, M, D] (or [M, D]) with the same B and D; float32 /
    float16 / bfloat16 (float64 inputs are centred in float64, searched with TF32 candidates
    and re-ranked in float64), on CUDA (or on CPU under TRITON_INTERPRET=1); 1 <= k <= M < 2^31. Inputs are
    assumed finite (fastgen.knn validates them).

    Returns (dist2 [B, N, k] ascending: the exact squared distance rounded once to float32, or
    float64 for float64 inputs; index int64 [B, N, k]) with ties going to the lowest key index; with ``_tiers=True`` also int32 [B, N]: the tier (1, 2, 3) that
    certified each query. No autograd: fastgen.knn wraps this in its autograd Function.
    """
    if not _HAS_TRITON:
        raise RuntimeError("knn_triton needs triton (pip install triton)")
    squeeze = query.dim() == 2
    if squeeze:
        query, key = query[None], key[None]
    query = query.detach()
    key = key.detach()
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(f"query and key must be both 2-D or both 3-D, got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    B, N, D = query.shape
    M = key.shape[1]
    if key.shape[0] != B or key.shape[2] != D:
        raise ValueError(f"key shape {tuple(key.shape)} does not match query shape {tuple(query.shape)}")
    if not (1 <= k <= M):
        raise ValueError(f"k must be in [1, M={M}], got {k}")
    if M >= 2 ** 31 - 2 * _MAX_C - 256:
        raise ValueError(f"key has M={M} rows; the triton backend supports M < 2^31")
    precision = _precision or ("tf32" if query.dtype in (torch.float32, torch.float64) else "bf16")
    if precision not in _EPS_OP:
        raise ValueError(f"_precision must be 'tf32' or 'bf16', got {precision!r}")
    C = _n_candidates if _n_candidates is not None else default_candidates(k)
    if C < k or C & (C - 1) or C > _MAX_C:
        raise ValueError(f"_n_candidates must be a power of two in [k, {_MAX_C}], got {C}")
    device = query.device
    interp = _interpret()

    # 1-2. tier 1: centring, tensor-core candidate pass, bound of the excluded keys
    cv, ci, lb, mu = _tier1(query, key, C, _split, precision)

    # 3. exact re-rank of the candidates, sorted by (distance, index): ties -> lowest index
    ex, si = _rerank(query, key, ci)
    ek = ex[..., k - 1]
    # result buffers with one spare row (index N) that absorbs scatters of unused rows
    d_out = torch.empty((B, N + 1, k), dtype=torch.float64, device=device)
    i_out = torch.empty((B, N + 1, k), dtype=torch.int64, device=device)
    flags = torch.zeros((B, N + 1), dtype=torch.int32, device=device)
    d_out[:, :N] = ex[..., :k]
    i_out[:, :N] = si[..., :k]

    # 4. certificate; the queries it cannot settle go to tiers 2, 3, 4
    flags[:, :N] = ~(lb > ek * (1.0 + (D + 8) * 2 * _U64))
    tier = torch.where(flags[:, :N] == 0, 1, 4).to(torch.int32) if _tiers else None
    # the one host synchronisation: how many queries tier 1 left (per batch, the largest), to
    # size tier 2. While a CUDA graph is being captured no host read is allowed: tiers 2-4 then
    # run over every row (the kernels skip rows whose flag is 0), so the graph is exact for any
    # input at the cost of the full-size tier-2 grouping.
    if _graph_capture(device):
        n_left = N
    else:
        n_left = int(flags.sum(1).max())
    if n_left:
        if _local:
            sub = torch.sort((flags[:, :N] != 1).to(torch.int8), dim=1, stable=True).indices[:, :n_left]
            _tier_local(query, key, mu, flags, d_out, i_out, ek, k, C, precision, sub.contiguous())
            if _tiers:
                tier = torch.where((tier == 4) & (flags[:, :N] == 0), 2, tier)
        _scan(3, query, key, flags, d_out, i_out, k, C, interp)
        if _tiers:
            tier = torch.where((tier == 4) & (flags[:, :N] == 0), 3, tier)
        _scan(4, query, key, flags, d_out, i_out, k, C, interp)
    d_out, i_out = d_out[:, :N], i_out[:, :N]

    # float64 inputs get the float64 exact distances (the fastgen.knn contract), else fp32
    dist2 = d_out if query.dtype == torch.float64 else d_out.to(torch.float32)
    out = [dist2, i_out]
    if _tiers:
        out.append(tier)
    if squeeze:
        out = [t[0] for t in out]
    return tuple(out)
