"""Plain-torch references of IMLE (ground truth for fastgen.imle_loss and
fastgen.imle.select_latents): brute force over every (example, sample) pair in float64.

For tests, not for speed: memory O(N * S * D).
"""
from __future__ import annotations

import torch


def _pairwise(data: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """data [B, N, D], samples [B, S, D] -> squared distances [B, N, S] in float64 (direct
    differences, no ||a||^2 - 2ab + ||b||^2 expansion)."""
    diff = data.to(torch.float64)[:, :, None, :] - samples.to(torch.float64)[:, None, :, :]
    return (diff * diff).sum(-1)


def nearest_eligible(data: torch.Tensor, samples: torch.Tensor, rejection_radius: float = 0.0):
    """For each example, the nearest sample whose Euclidean distance is >= rejection_radius.

    data [B, N, D], samples [B, S, D]. Returns (dist2 float64 [B, N], index int64 [B, N],
    found bool [B, N]); ties go to the lowest sample index; where no sample is eligible,
    found is False, dist2 is +inf and index is 0.
    """
    d = _pairwise(data, samples)
    if rejection_radius > 0:
        d = torch.where(d < float(rejection_radius) ** 2, torch.full_like(d, float("inf")), d)
    dist2, index = d.min(dim=-1)  # torch.min returns the first (lowest) index among ties
    found = torch.isfinite(dist2)
    index = torch.where(found, index, torch.zeros_like(index))
    return dist2, index, found


def imle_loss(samples: torch.Tensor, data: torch.Tensor, *, conditional: bool = False,
              rejection_radius: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Brute-force IMLE loss: mean over examples of min_j ||data_i - samples_j||^2 (float64).

    Same shapes and semantics as :func:`fastgen.imle_loss`: samples [S, ...] vs data [N, ...];
    conditional: samples [B, S, ...] vs data [B, N, ...] or [B, ...]. RS-IMLE: samples closer
    than ``rejection_radius`` are not eligible; an example with no eligible sample contributes
    0 (and counts in the mean). The gradient flows into ``samples`` only.
    """
    one_per_condition = False
    if conditional:
        B = samples.shape[0]
        if data.dim() == samples.dim() - 1:
            one_per_condition = True
            data = data.unsqueeze(1)
        s = samples.reshape(B, samples.shape[1], -1)
        x = data.reshape(B, data.shape[1], -1)
    else:
        s = samples.reshape(1, samples.shape[0], -1)
        x = data.reshape(1, data.shape[0], -1)
    x = x.detach()
    _, index, found = nearest_eligible(x, s.detach(), rejection_radius)
    picked = torch.gather(s.to(torch.float64), 1, index[..., None].expand(-1, -1, s.shape[-1]))
    per = ((x.to(torch.float64) - picked) ** 2).sum(-1)
    per = torch.where(found, per, torch.zeros_like(per))
    if not conditional:
        per = per[0]
    elif one_per_condition:
        per = per[:, 0]
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    return per


def select_latents(candidates: torch.Tensor, samples: torch.Tensor, data: torch.Tensor,
                   rejection_radius: float = 0.0):
    """Brute-force latent selection over a materialised pool.

    candidates [P, L] (the latents, in pool order), samples [P, ...] = generator(candidates),
    data [N, ...]. Returns (latents [N, L], dist2 float64 [N]): for each example the candidate
    whose sample is nearest (lowest pool index among ties); with rejection_radius > 0 the
    nearest among candidates at distance >= rejection_radius, falling back to the nearest
    overall when every candidate is rejected (as fastgen.imle.select_latents documents).
    """
    x = data.reshape(1, data.shape[0], -1)
    s = samples.reshape(1, samples.shape[0], -1)
    d, i, found = nearest_eligible(x, s, rejection_radius)
    if rejection_radius > 0:
        d0, i0, _ = nearest_eligible(x, s, 0.0)
        d = torch.where(found, d, d0)
        i = torch.where(found, i, i0)
    return candidates[i[0]], d[0]
