"""Input checks shared by the public functions: bad input raises ValueError / TypeError naming
the argument, never a wrong answer."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, x, *, ndims: tuple[int, ...] | None = None, float_only: bool = True,
                 allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if float_only and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), "
                        f"got {x.dtype}")
    if ndims is not None and x.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if not allow_empty and x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    dev = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev:
            raise ValueError(f"{n} is on {t.device} but {items[0][0]} is on {dev}: all inputs must be on one device")
    return dev


def capturing(x: torch.Tensor) -> bool:
    """True while ``x``'s device stream is being captured into a CUDA graph: no host read of a
    device value is allowed then (it would end the capture with an error)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def nonfinite_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [..., N] for x [..., N, D]: rows holding NaN or inf (a device tensor, no host read)."""
    return ~torch.isfinite(x).all(-1)


def check_finite(name: str, x: torch.Tensor) -> None:
    """Raise ValueError if x holds NaN or inf. Costs one reduction and a host read: call it on
    user-facing paths where a silent wrong answer is worse (knn), not in fused hot loops."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")


def check_sigma_values(sigma: torch.Tensor, *, allow_zero: bool) -> None:
    """ValueError unless every entry of sigma is finite and > 0 (>= 0 with ``allow_zero``): one
    reduction and one bool read back to the host (on CUDA); NaN fails. Pass sigma as a Python
    float to avoid the read."""
    if sigma.numel() == 0:
        return
    lo, hi = torch.aminmax(sigma.detach())
    if not bool(((lo >= 0) if allow_zero else (lo > 0)) & (hi < math.inf)):
        raise ValueError(f"sigma must be finite and {'>=' if allow_zero else '>'} 0 everywhere")


def check_positive_int(name: str, v, *, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_reduction(reduction) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


SPREAD_KINDS = ("gaussian", "laplace")


def check_kind(kind) -> str:
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a string, got {type(kind).__name__}")
    if kind not in SPREAD_KINDS:
        extra = ""
        if kind in ("uniform", "box", "rectangular"):
            extra = (" (uniform noise is not a valid spread: its Fourier transform has zeros, so "
                     "KL(p*K || q*K) = 0 would not imply p = q)")
        raise ValueError(f"kind must be one of {SPREAD_KINDS}, got {kind!r}{extra}")
    return kind
