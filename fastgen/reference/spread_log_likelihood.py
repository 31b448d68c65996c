"""Plain-torch reference of :func:`fastgen.spread_log_likelihood` (ground truth, float64).

    out[n] = log( 1/S sum_s K_sigma(y_n - samples_s) )

with K the normalised Gaussian density of std sigma_j, or Laplace density of scale b_j = sigma_j,
in D dimensions (product over j). Computed in float64 from direct differences y_n - samples_s
(never the ||y||^2 - 2 y.x + ||x||^2 expansion), a chunked logsumexp over samples, and plain
autograd: differentiable w.r.t. y, samples and sigma. Memory O(chunk * S * D).
"""
from __future__ import annotations

import math

import torch


def log_kernel_reference(d: torch.Tensor, sigma: torch.Tensor, kind: str) -> torch.Tensor:
    """log K_sigma(d) summed over the last dimension (float64). sigma: [] or [D]."""
    if kind == "gaussian":
        z = d / sigma
        return (-0.5 * z * z - torch.log(sigma) - 0.5 * math.log(2 * math.pi)).sum(-1)
    if kind == "laplace":
        return (-d.abs() / sigma - torch.log(2 * sigma)).sum(-1)
    raise ValueError(f"kind must be 'gaussian' or 'laplace', got {kind!r}")


def spread_log_likelihood_reference(y: torch.Tensor, samples: torch.Tensor, sigma, kind: str = "gaussian",
                                    *, chunk: int = 256) -> torch.Tensor:
    """float64 [N] log (1/S sum_s K_sigma(y_n - samples_s)); sigma a float, a 0-d / [1] tensor
    or a [D] tensor (per-dimension scale)."""
    y64 = y.to(torch.float64)
    x64 = samples.to(torch.float64)
    if isinstance(sigma, torch.Tensor):
        s = sigma.to(torch.float64, copy=False)
        s = s.reshape(()) if s.numel() == 1 else s.reshape(-1)
    else:
        s = torch.tensor(float(sigma), dtype=torch.float64, device=y.device)
    S = x64.shape[0]
    outs = []
    for i in range(0, y64.shape[0], chunk):
        d = y64[i:i + chunk, None, :] - x64[None, :, :]
        outs.append(torch.logsumexp(log_kernel_reference(d, s, kind), dim=1) - math.log(S))
    return torch.cat(outs)
