"""Plain-torch reference of fastgen.knn: exact brute force in float64 (ground truth)."""
from __future__ import annotations

import torch


def knn(query: torch.Tensor, key: torch.Tensor, k: int = 1, *, chunk: int = 1024):
    """Exact k nearest neighbours by direct differences in float64.

    query [N, D] or [B, N, D], key [M, D] or [B, M, D] (any float dtype; the values are taken
    exactly as float64). Returns (dist2 float64 [.., N, k] ascending, index int64 [.., N, k]);
    ties go to the lowest key index. Memory O(chunk * M * D); for tests, not for speed.
    """
    squeeze = query.dim() == 2
    q = query.detach().to(torch.float64)
    kk = key.detach().to(torch.float64)
    if squeeze:
        q, kk = q[None], kk[None]
    B, N, _ = q.shape
    M = kk.shape[1]
    d_out = torch.empty(B, N, k, dtype=torch.float64, device=q.device)
    i_out = torch.empty(B, N, k, dtype=torch.int64, device=q.device)
    for b in range(B):
        for s in range(0, N, chunk):
            diff = q[b, s:s + chunk, None, :] - kk[b, None, :, :]
            d = (diff * diff).sum(-1)  # [n, M]
            # stable sort on (distance, index): lexicographic via a stable sort of sorted indices
            order = torch.sort(d, dim=1, stable=True).indices[:, :k]
            d_out[b, s:s + chunk] = torch.gather(d, 1, order)
            i_out[b, s:s + chunk] = order
    if squeeze:
        return d_out[0], i_out[0]
    return d_out, i_out
