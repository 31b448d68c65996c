"""Plain-torch reference of fastgen.knn: exact brute force in float64 (ground truth)."""
from __future__ import annotations

import torch

_ELEMS = 1 << 24  # float64 elements of the largest temporary (128 MiB)


def knn(query: torch.Tensor, key: torch.Tensor, k: int = 1, *, chunk: int | None = None):
    """Exact k nearest neighbours by direct differences in float64.

    query [N, D] or [B, N, D], key [M, D] or [B, M, D] (any float dtype; the values are taken
    exactly as float64). Returns (dist2 float64 [.., N, k] ascending, index int64 [.., N, k]);
    ties go to the lowest key index (a stable sort of the distances in index order).
    Memory: the [rows, M] distance block plus a [rows, keys, D] difference block of at most
    2^24 elements (``chunk`` forces the number of query rows per block), then the [.., N, k, D]
    differences at the chosen neighbours (the differentiable dist2). For tests, not speed.

    dist2 is differentiable w.r.t. query and key (any order, forward and reverse mode, as
    :func:`neighbour_dist2` at the returned indices): the reference of fastgen.knn's derivatives.
    """
    squeeze = query.dim() == 2
    q = query.detach().to(torch.float64)
    kk = key.detach().to(torch.float64)
    if squeeze:
        q, kk = q[None], kk[None]
    B, N, D = q.shape
    M = kk.shape[1]
    rows = chunk or max(1, min(N, _ELEMS // max(1, M * D), _ELEMS // max(1, M)))
    keys = max(1, min(M, _ELEMS // max(1, rows * D)))
    i_out = torch.empty(B, N, k, dtype=torch.int64, device=q.device)
    for b in range(B):
        for s in range(0, N, rows):
            e = min(N, s + rows)
            d = torch.empty(e - s, M, dtype=torch.float64, device=q.device)
            for m0 in range(0, M, keys):
                m1 = min(M, m0 + keys)
                diff = q[b, s:e, None, :] - kk[b, None, m0:m1, :]
                d[:, m0:m1] = (diff * diff).sum(-1)
            # stable sort of the distances (columns in index order): ties -> lowest index
            i_out[b, s:e] = torch.sort(d, dim=1, stable=True).indices[:, :k]
    # the same float64 values, recomputed differentiably at the chosen neighbours
    q64, k64 = query.to(torch.float64), key.to(torch.float64)
    d_out = neighbour_dist2(q64[None] if squeeze else q64, k64[None] if squeeze else k64, i_out)
    if squeeze:
        return d_out[0], i_out[0]
    return d_out, i_out


def neighbour_dist2(query: torch.Tensor, key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """||query_i - key[index_ij]||^2 by direct differences in plain torch: the reference of
    fastgen.knn's derivatives (dist2 is differentiable with the neighbours held fixed; the
    argmin is piecewise constant). query [N, D] / key [M, D] / index [N, k], or batched
    [B, N, D] / [B, M, D] / [B, N, k] -> [.., N, k] in the inputs' dtype; differentiable (any
    order, forward and reverse mode, vmap) w.r.t. query and key."""
    if query.dim() == 2:
        return (query[:, None, :] - key[index]).pow(2).sum(-1)
    b = torch.arange(query.shape[0], device=query.device)[:, None, None]
    return (query[:, :, None, :] - key[b, index]).pow(2).sum(-1)
