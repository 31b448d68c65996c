"""Plain-torch reference of :func:`fastgen.spread_noise`: ``y = x + sigma * eps``.

The fused backends generate ``eps`` from a counter-based generator and never store it; the
reference takes ``eps`` explicitly, so that tests can feed a backend's own noise (recovered with
``x = 0``, ``sigma = 1``) and compare values and autograd gradients exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def spread_noise_reference(x: torch.Tensor, sigma, eps: torch.Tensor) -> torch.Tensor:
    """``x + sigma * eps`` computed in float64 and cast back to ``x.dtype``.

    Differentiable w.r.t. ``x`` and ``sigma`` by plain autograd: ``grad_x = grad_y`` and
    ``grad_sigma = sum(eps * grad_y)`` over the dimensions along which sigma is broadcast."""
    s = sigma.double() if isinstance(sigma, torch.Tensor) else float(sigma)
    return (x.double() + s * eps.double()).to(x.dtype)


def sample_noise_reference(shape, kind: str = "gaussian", *, generator=None, dtype=torch.float64,
                           device="cpu") -> torch.Tensor:
    """Draws of the unit spread law with torch's own samplers: N(0, 1), or Laplace(0, 1) (scale
    b = 1: density exp(-|e|) / 2, variance 2)."""
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if kind == "laplace":
        mag = torch.empty(shape, dtype=dtype, device=device).exponential_(1.0, generator=generator)
        sign = torch.randint(0, 2, shape, generator=generator, device=device).to(dtype) * 2 - 1
        return mag * sign
    raise ValueError(f"kind must be 'gaussian' or 'laplace', got {kind!r}")


def unit_cdf(kind: str):
    """The CDF of the unit spread law, for Kolmogorov-Smirnov tests (vectorised over numpy arrays)."""
    import numpy as np

    if kind == "gaussian":
        from scipy.special import ndtr

        return ndtr
    if kind == "laplace":
        return lambda e: np.where(e < 0, 0.5 * np.exp(np.minimum(e, 0)), 1 - 0.5 * np.exp(-np.maximum(e, 0)))
    raise ValueError(f"kind must be 'gaussian' or 'laplace', got {kind!r}")


def unit_variance(kind: str) -> float:
    """Variance of the unit spread law: 1 (Gaussian), 2 (Laplace with b = 1)."""
    return {"gaussian": 1.0, "laplace": 2.0}[kind]


def unit_log_density(e: torch.Tensor, kind: str) -> torch.Tensor:
    """log density of the unit law at ``e``: -e^2/2 - log(2 pi)/2, or -|e| - log 2."""
    if kind == "gaussian":
        return -0.5 * e * e - 0.5 * math.log(2 * math.pi)
    if kind == "laplace":
        return -e.abs() - math.log(2.0)
    raise ValueError(f"kind must be 'gaussian' or 'laplace', got {kind!r}")


# ----------------------------------------------------------------------- the kernels' noise stream
# The noise layout of csrc/cpu/spread_noise.cpp (shared with the Triton kernel): element i ->
# chunk c = i // 256, w = i % 256, lane = w // 64, g = w % 64; Philox-4x32-10 counter
# offset + 64 c + g (64-bit), key = (seed low 32, seed high 32); word `lane` of that counter.
_M = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr: np.ndarray, seed: int) -> np.ndarray:
    """Philox-4x32-10 of 64-bit counters ``ctr`` (uint64 [n]), key = seed: uint32 words [4, n]."""
    c0 = ctr & _M
    c1 = ctr >> np.uint64(32)
    c2 = np.zeros_like(ctr)
    c3 = np.zeros_like(ctr)
    k0 = np.uint64(seed & 0xFFFFFFFF)
    k1 = np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        n0 = (p1 >> np.uint64(32)) ^ c1 ^ k0
        n2 = (p0 >> np.uint64(32)) ^ c3 ^ k1
        c1, c3, c0, c2 = p1 & _M, p0 & _M, n0, n2
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M
    return np.stack([c0, c1, c2, c3])  # [4, n]


def stream_noise_reference(numel: int, kind: int, seed: int, offset: int) -> np.ndarray:
    """float64 eps of the fused kernels' stream for ``numel`` elements, kind 0 Gaussian (Box-Muller)
    or 1 Laplace, generator ``seed`` and counter ``offset``: the kernels' float32 rounding of the
    uniforms mirrored, the transcendental functions exact (numpy, float64). For the kernel tests of
    every CPU path (tests/isa_check.py) and the installed-wheel smoke test (tools/wheel_smoke.py)."""
    i = np.arange(numel, dtype=np.uint64)
    c, w = i // np.uint64(256), i % np.uint64(256)
    lane, g = (w // np.uint64(64)).astype(np.int64), w % np.uint64(64)
    ctr = np.uint64(offset) + np.uint64(64) * c + g
    words = philox4x32_10(ctr, seed)
    if kind == 0:  # Box-Muller on the word pairs (0, 1) and (2, 3)
        pair = lane // 2
        a = words[2 * pair, np.arange(numel)]
        b = words[2 * pair + 1, np.arange(numel)]
        u1 = (a.astype(np.float32) * np.float32(2.0 ** -32) + np.float32(0.5 * 2.0 ** -32)).astype(np.float64)
        r = np.sqrt(-2.0 * np.log(u1))
        th = 2.0 * math.pi * b.astype(np.float64) * 2.0 ** -32
        return np.where(lane % 2 == 0, r * np.cos(th), r * np.sin(th))
    wd = words[lane, np.arange(numel)]
    m = (wd & np.uint64(0x7FFFFFFF)).astype(np.float32) * np.float32(2.0 ** -31) + np.float32(0.5 * 2.0 ** -31)
    mag = -np.log(m.astype(np.float64))
    return np.where(wd >> np.uint64(31) != 0, -mag, mag)
