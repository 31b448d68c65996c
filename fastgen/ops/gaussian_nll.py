"""gaussian_nll_loss: a fused, drop-in torch.nn.functional.gaussian_nll_loss, as ONE torch custom op.

``fastgen.gaussian_nll_loss`` and ``fastgen.nn.GaussianNLLLoss`` validate their arguments (torch's
rules and messages) and call the op ``fastgen::gaussian_nll_loss``, in eager mode and under
torch.compile / torch.export alike. Registered once on that op (fastgen/_compile.py):

* the implementation, which asks fastgen._dispatch (op "gaussian_nll") for the backend when it
  runs: ``cpu`` (fastgen._C, csrc/cpu/gaussian_nll.cpp: one OpenMP pass), ``triton`` (the kernel
  below; on CPU under TRITON_INTERPRET=1) or ``torch`` (the formula on the same plan);
* the fake kernel (shapes and the promoted dtype);
* the autograd kernel :class:`_NLLFunction`: backward, forward-mode AD (``jvp``), and a
  differentiable backward (double backward, forward-over-reverse, vmap over the backward);
* the vmap rule :func:`_vmap_rule`: one call of the op on the batched shape, then a per-sample
  reduction (no Python loop over the batch).

Fast paths (eager and compiled): when the reduction is "mean" or "sum" and grad mode is on, the
forward pass calls the internal op ``fastgen::_gaussian_nll_loss_fused``, which also writes the
gradients for input, target and var in the same pass over memory (Liger-Kernel style); backward
only scales them by grad_output (on the host for CPU tensors: nothing to do when it is 1; on
device for CUDA). For reduction "none" backward is one fused pass, ``fastgen::
_gaussian_nll_loss_backward``. Both run only when the backward need not be differentiable
(:func:`fastgen._compile.fast_backward`); with ``create_graph=True`` or under a torch.func
transform the backward is the plain-torch formula :func:`_formula_coefs` instead, with every
derivative straight through the eps clamp (torch's rule for the first derivative).

The fused backends share one plan. The broadcast shape of (input, target, var) is viewed as
[A, B, C] with var [A, C] broadcast over B: per-element var is (1, 1, N), var [..., 1] or one
dimension fewer is (rows, D, 1), a size-1 dimension in the middle of var ([4, 1, 32, 32] for
input [4, 3, 32, 32]) is (4, 3, 1024). The kernels find var by index arithmetic, never by
expanding it.

Negative var (torch's check, argument ``check_var`` of the op): the fused kernels fold it into
their pass (a flag). Mode 1 (eager) reads that flag once per call and raises ValueError: the one
host sync of the op on GPU. Mode 2 (what the public function passes under torch.compile) raises
on CPU and makes the loss NaN on other devices (on device: no sync, CUDA-graph safe). Mode 0
(``check_var=False`` or ``log_var=True``): no check. The check is inside the op, so it holds under
torch.func.vmap too (torch's own F.gaussian_nll_loss fails there: its check is Python control
flow on data). Reductions finish on the device.
"""
from __future__ import annotations

import contextlib
import math
import os
from types import SimpleNamespace

import torch
from torch.autograd.forward_ad import _set_fwd_grad_enabled
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .. import _backend, _compile, _dispatch
from ..reference import gaussian_nll as _ref

try:  # Triton is optional: `import fastgen` works without it
    import triton
    import triton.language as tl

    _HAS_TRITON = True
except Exception:  # pragma: no cover - exercised on machines without triton
    triton = tl = None
    _HAS_TRITON = False

_RED = {"none": 0, "mean": 1, "sum": 2}
_HALF_LOG_2PI = _ref.HALF_LOG_2PI
# check_var modes of the op (see the module doc)
CHECK_OFF, CHECK_RAISE, CHECK_ON_DEVICE = 0, 1, 2


class _ShapeError(ValueError, RuntimeError):
    """Raised when target does not broadcast with input. Its message contains torch's ("The size
    of tensor a (3) must match the size of tensor b (2) at non-singleton dimension 2"); it is the
    RuntimeError torch raises there and a ValueError (fastgen's rule for bad input)."""


# ----------------------------------------------------------------------------------------------
# argument checks of the public function (torch's order: var type, negative var, var size,
# reduction; the target shape is checked by the op)
# ----------------------------------------------------------------------------------------------
def _is_real_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _any_negative(var, log_var: bool) -> bool:
    """(error paths only: which error to raise. No data-dependent read under torch.compile; under
    torch.func.vmap the read fails and the other error is raised.)"""
    if (not isinstance(var, torch.Tensor) or log_var or var.numel() == 0 or var.device.type == "meta"
            or _compile.is_compiling() or var.is_complex()):
        return False
    try:
        return bool(torch.any(var < 0))
    except Exception:  # e.g. a BatchedTensor: a data-dependent read under vmap
        return False


def _fail(exc: Exception, var, log_var: bool):
    """Raise exc, unless var has a negative entry: torch checks that first."""
    if _any_negative(var, log_var):
        raise ValueError("var has negative entry/entries")
    raise exc


def _check_args(input, target, var, full, eps, reduction, log_var, beta):
    """Validate everything but the sign of a var tensor (checked inside the op) and the target's
    shape (the op). Returns var as a tensor resolved to torch's shape rule (a float var becomes a
    tensor of input's dtype with input's number of dimensions)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if isinstance(var, float):  # torch accepts a Python float (not an int) as a homoscedastic var
        if var < 0 and not log_var:
            raise ValueError("var has negative entry/entries")
    elif not isinstance(var, torch.Tensor):
        raise TypeError(f"var must be a torch.Tensor or a float, got {type(var).__name__}")
    if not input.dtype.is_floating_point:
        _fail(TypeError(f"input must be a floating-point tensor, got {input.dtype}"), var, log_var)
    if target.dtype.is_complex or target.dtype == torch.bool:
        _fail(TypeError(f"target must be a real tensor, got {target.dtype}"), var, log_var)
    if isinstance(var, torch.Tensor) and not var.dtype.is_floating_point:
        _fail(TypeError(f"var must be a floating-point tensor, got {var.dtype}"), var, log_var)
    if isinstance(var, torch.Tensor):
        for name, t in (("target", target), ("var", var)):
            if t.device != input.device:
                _fail(ValueError(f"{name} is on {t.device} but input is on {input.device}: all inputs "
                                 f"must be on one device"), var, log_var)
        if var.size() != input.size():
            try:
                var = _ref.resolve_var_shape(input, var)
            except ValueError:
                _fail(ValueError(f"var is of incorrect size: var {tuple(var.shape)} for input "
                                 f"{tuple(input.shape)} (same size, one dimension fewer, or one "
                                 f"dimension of size 1)"), var, log_var)
    elif target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}: all inputs "
                         f"must be on one device")
    if not isinstance(reduction, str):
        _fail(TypeError(f"reduction must be a string ('none', 'mean' or 'sum'), got "
                        f"{type(reduction).__name__}"), var, log_var)
    if reduction not in _RED:
        _fail(ValueError(f"{reduction} is not valid: reduction must be 'none', 'mean' or 'sum'"), var, log_var)
    if not _is_real_number(eps):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not _is_real_number(beta):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    if not (0 <= beta < math.inf):  # (no math.isfinite: dynamo with dynamic=True)
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if isinstance(var, float):  # torch: var * ones_like(input): input's dtype and dimensions
        var = torch.full((1,) * input.dim(), var, dtype=input.dtype, device=input.device)
    return var


# ----------------------------------------------------------------------------------------------
# shapes and the [A, B, C] plan
# ----------------------------------------------------------------------------------------------
def _result_dtype(input, target, var) -> torch.dtype:
    """The dtype torch's formula gives (type promotion, 0-dim rules included)."""
    if input.dtype == target.dtype == var.dtype:
        return var.dtype
    meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")  # noqa: E731
    i, t, v = meta(input), meta(target), meta(var)
    return (0.5 * (torch.log(v) + (i - t) ** 2 / v)).dtype


def _mismatch(a, b) -> str | None:
    """torch's broadcast error text for shapes a, b (at::infer_size: the last failing dimension,
    numbered in the broadcast shape), or None when they broadcast."""
    nd = max(len(a), len(b))
    for i in range(nd - 1, -1, -1):
        ia, ib = i - (nd - len(a)), i - (nd - len(b))
        sa = a[ia] if ia >= 0 else 1
        sb = b[ib] if ib >= 0 else 1
        if sa != sb and sa != 1 and sb != 1:
            return (f"The size of tensor a ({sa}) must match the size of tensor b ({sb}) at non-singleton "
                    f"dimension {i}")
    return None


def _broadcast2(a, b) -> list:
    nd = max(len(a), len(b))
    a, b = (1,) * (nd - len(a)) + tuple(a), (1,) * (nd - len(b)) + tuple(b)
    return [y if x == 1 else x for x, y in zip(a, b)]


def _broadcast_shape(input, target, var) -> torch.Size:
    """The broadcast shape of (input, target, var); _ShapeError with torch's message otherwise
    (torch's formula computes (input - target) ** 2 / var: a = input, b = target, then a = their
    broadcast, b = var)."""
    s_in, s_t, s_v = input.shape, target.shape, var.shape
    if s_in == s_t == s_v:
        return s_in
    if s_in == s_t:
        out = s_in
    else:
        msg = _mismatch(s_in, s_t)
        if msg is not None:
            raise _ShapeError(f"{msg} (target of shape {tuple(s_t)} does not broadcast with input of shape "
                              f"{tuple(s_in)})")
        out = _broadcast2(s_in, s_t)
    msg = _mismatch(out, s_v)
    if msg is not None:
        raise _ShapeError(f"{msg} (var of shape {tuple(s_v)} does not broadcast with the shape "
                          f"{tuple(out)} of input and target)")
    return torch.Size(_broadcast2(out, s_v))


def _var_plan(vshape, out_shape):
    """(A, B, C) such that var, viewed [A, C], is broadcast over B of out [A, B, C]; None when the
    broadcast dimensions of var are not one contiguous run (then var is expanded)."""
    nd = len(out_shape)
    vs = (1,) * (nd - len(vshape)) + tuple(vshape)
    dims = [(o, "k" if s == o else "b") for o, s in zip(out_shape, vs) if o != 1]
    bidx = [i for i, (_, k) in enumerate(dims) if k == "b"]
    n = math.prod([o for o, _ in dims])  # (lists, not generators: dynamo traces them)
    if not bidx:
        return 1, 1, n
    lo, hi = bidx[0], bidx[-1]
    for _, k in dims[lo:hi + 1]:  # (a loop, not any(<genexpr>): dynamo traces it)
        if k != "b":
            return None
    A = math.prod([o for o, _ in dims[:lo]])
    B = math.prod([o for o, _ in dims[lo:hi + 1]])
    return A, B, n // (A * B)


def _plan(input, target, var, out_shape, dt):
    """Flat contiguous (x, t, v) in the result dtype dt and the (A, B, C) plan (see module doc)."""
    N = math.prod(out_shape)
    x, t, v = (a if a.dtype == dt else a.to(dt) for a in (input, target, var))
    plan = _var_plan(v.shape, out_shape)
    if plan is None:  # broadcast dims of var not contiguous (only when target widens input)
        v = v.expand(out_shape)
        plan = (1, 1, N)
    if x.shape != out_shape:  # target wider than input (rare): the gradient is summed back
        x = x.expand(out_shape)
    if t.shape != out_shape:
        t = t.expand(out_shape)
    return x.contiguous().view(-1), t.contiguous().view(-1), v.contiguous().view(-1), plan


def _grad_like(g, like, out_shape):
    """A flat gradient over out_shape (or over like's elements) -> like's shape and dtype."""
    if g.numel() == like.numel():
        g = g.view(like.shape)
    else:
        g = g.view(out_shape).sum_to_size(like.shape)
    return g if g.dtype == like.dtype else g.to(like.dtype)


# ----------------------------------------------------------------------------------------------
# backends: kernels on the flat plan, registered with fastgen._dispatch as callables
#   k("forward", x, t, v, A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v)
#       -> (loss, grad_x, grad_t, grad_v, neg)   (gradients of the reduced loss, or 0-element)
#   k("backward", go, x, t, v, A, B, C, full, eps, log_var, beta, need_x, need_t, need_v)
#       -> (grad_x, grad_t, grad_v)              (reduction "none", per-element grad_output)
# ----------------------------------------------------------------------------------------------
class _Kernels(SimpleNamespace):
    def __call__(self, what, *args):
        return getattr(self, what)(*args)


# ---- cpu: fastgen._C --------------------------------------------------------------------------
@_backend.fake("_gaussian_nll_kernel")
def _(x, t, v, A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v):  # csrc/cpu/gaussian_nll.cpp
    grads = red != 0 and (need_x or need_t or need_v)
    return (x.new_empty((A * B * C,) if red == 0 else ()), x.new_empty((A * B * C,) if grads and need_x else (0,)),
            x.new_empty((A * B * C,) if grads and need_t else (0,)), x.new_empty((A * C,) if grads and need_v else (0,)),
            x.new_empty((), dtype=torch.int32))


@_backend.fake("_gaussian_nll_backward_kernel")
def _(go, x, t, v, A, B, C, full, eps, log_var, beta, need_x, need_t, need_v):
    return (x.new_empty((A * B * C,) if need_x else (0,)), x.new_empty((A * B * C,) if need_t else (0,)),
            x.new_empty((A * C,) if need_v else (0,)))


_CPU = _dispatch.register("gaussian_nll", "cpu")(_Kernels(
    forward=lambda *a: _backend.ext_op("_gaussian_nll_kernel")(*a),
    backward=lambda *a: _backend.ext_op("_gaussian_nll_backward_kernel")(*a),
))


# ---- triton -----------------------------------------------------------------------------------
if _HAS_TRITON:

    @triton.jit
    def _nll_kernel(X, T, V, GO, LOSS, GX, GT, GV, PART, NEG,
                    A, B, C, n_cblk, n_bsplit, b_per_split, eps_hi, eps_lo, beta_hi, beta_lo, c_hi, c_lo, SCALE_N,
                    LOGV: tl.constexpr, BETA: tl.constexpr, CHECK_NEG: tl.constexpr,
                    W_LOSS: tl.constexpr, RED: tl.constexpr, HAS_GO: tl.constexpr,
                    W_GX: tl.constexpr, W_GT: tl.constexpr, W_GV: tl.constexpr, GV_STRIDE,
                    CDT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
        # program -> (a, c block, b range); var tile [BLOCK_C] loaded once, broadcast over b.
        # float arguments reach the kernel as float32: hi + lo restores float64 scalars
        zero = tl.full([], 0.0, CDT)  # (an int argument of 1 arrives as a constant: no .to())
        eps = (zero + eps_hi) + eps_lo
        beta = (zero + beta_hi) + beta_lo
        const = (zero + c_hi) + c_lo
        pid = tl.program_id(0)
        bs = pid % n_bsplit
        rest = pid // n_bsplit
        cb = rest % n_cblk
        a = (rest // n_cblk).to(tl.int64)
        offs_c = cb.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        v = tl.load(V + a * C + offs_c, mask=mask_c, other=1.0).to(CDT)
        if LOGV:
            lg = v
            inv = tl.exp(-v)
        else:
            vc = tl.where(v < eps, eps, v)  # NaN stays NaN, like torch.clamp
            inv = 1.0 / vc
            lg = tl.log(vc)
        if BETA:
            w = tl.exp(beta * lg)
        else:
            w = tl.full([BLOCK_C], 1.0, CDT)
        b_lo = bs.to(tl.int64) * b_per_split
        b_hi = tl.minimum(b_lo + b_per_split, B)
        loss_acc = tl.zeros([BLOCK_B, BLOCK_C], CDT)
        gv_acc = tl.zeros([BLOCK_B, BLOCK_C], CDT)
        for b0 in range(b_lo, b_hi, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            mask = (offs_b < b_hi)[:, None] & mask_c[None, :]
            idx = (a * B + offs_b[:, None]) * C + offs_c[None, :]
            x = tl.load(X + idx, mask=mask, other=0.0).to(CDT)
            t = tl.load(T + idx, mask=mask, other=0.0).to(CDT)
            d = x - t
            r2 = d * d * inv[None, :]
            l = w[None, :] * (0.5 * (lg[None, :] + r2) + const)
            if W_LOSS:
                tl.store(LOSS + idx, l.to(LOSS.dtype.element_ty), mask=mask)
            if RED:
                loss_acc += tl.where(mask, l, 0.0)
            if W_GX or W_GT or W_GV:
                if HAS_GO:
                    f = tl.load(GO + idx, mask=mask, other=0.0).to(CDT)
                else:
                    f = 1.0 / (zero + SCALE_N)  # 1/N for the mean, 1 for the sum
                gi = (w * inv)[None, :] * d * f
                if W_GX:
                    tl.store(GX + idx, gi.to(GX.dtype.element_ty), mask=mask)
                if W_GT:
                    tl.store(GT + idx, (-gi).to(GT.dtype.element_ty), mask=mask)
                if W_GV:
                    if LOGV:
                        gvv = (0.5 * w)[None, :] * (1.0 - r2) * f
                    else:
                        gvv = (0.5 * w * inv)[None, :] * (1.0 - r2) * f
                    gv_acc += tl.where(mask, gvv, 0.0)
        if W_GV:  # reduced over this program's b range; GV_STRIDE separates partial rows
            gsum = tl.sum(gv_acc, axis=0)
            tl.store(GV + bs.to(tl.int64) * GV_STRIDE + a * C + offs_c, gsum.to(GV.dtype.element_ty),
                     mask=mask_c)
        if RED:
            tl.store(PART + pid, tl.sum(tl.sum(loss_acc, axis=1), axis=0))
        if CHECK_NEG:
            nneg = tl.sum(((v < 0) & mask_c).to(tl.int32), axis=0)
            tl.atomic_max(NEG, nneg, mask=nneg > 0)  # only when found: no contention normally

    @triton.jit
    def _scale_kernel(G, GO, N, CDT: tl.constexpr, BLOCK: tl.constexpr):
        # G *= GO[0], skipped on device when GO[0] == 1 (loss.backward()): no host read.
        go = tl.load(GO).to(CDT)
        if go != 1.0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < N
            g = tl.load(G + offs, mask=mask, other=0.0).to(CDT)
            tl.store(G + offs, (g * go).to(G.dtype.element_ty), mask=mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tl_cdt(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _hilo(x: float) -> tuple[float, float]:
    """x = hi + lo with hi, lo float32 (about 48 significant bits)."""
    import numpy as np

    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def _triton_cfg(A, B, C, device):
    """Block shapes and the split of B: (BLOCK_B, BLOCK_C, n_cblk, n_bsplit, b_per_split, warps)."""
    big = 1024 if _interpreting() else 4096
    if B == 1:  # per-element var: a flat elementwise pass
        BLOCK_C, BLOCK_B = big, 1
    else:
        BLOCK_C = min(triton.next_power_of_2(C), 256 if C < 4096 else 1024)
        BLOCK_B = max(1, big // BLOCK_C)
    n_cblk = triton.cdiv(C, BLOCK_C)
    if B == 1:
        n_bsplit, b_per_split = 1, 1
    else:
        if device.type == "cuda":
            target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        else:
            target = 8
        n_bsplit = max(1, min(triton.cdiv(B, BLOCK_B), triton.cdiv(target, A * n_cblk)))
        b_per_split = triton.cdiv(triton.cdiv(B, n_bsplit), BLOCK_B) * BLOCK_B
        n_bsplit = triton.cdiv(B, b_per_split)
    warps = 8 if BLOCK_B * BLOCK_C >= 4096 else 4
    return BLOCK_B, BLOCK_C, n_cblk, n_bsplit, b_per_split, warps


def _triton_launch(x, t, v, go, A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v, grad):
    dev, dt = x.device, x.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    N = A * B * C
    BLOCK_B, BLOCK_C, n_cblk, n_bsplit, b_per_split, warps = _triton_cfg(A, B, C, dev)
    grid = A * n_cblk * n_bsplit
    w_loss = red == 0 and go is None
    loss = torch.empty(N, dtype=dt, device=dev) if w_loss else None
    part = torch.empty(grid, dtype=acc, device=dev) if red != 0 else None
    gx = torch.empty_like(x) if grad and need_x else None
    gt = torch.empty_like(t) if grad and need_t else None
    gv = gvp = None
    if grad and need_v:
        gv = torch.empty_like(v) if n_bsplit == 1 else None
        gvp = gv if n_bsplit == 1 else torch.empty(n_bsplit * A * C, dtype=acc, device=dev)
    check = not log_var and go is None
    neg = torch.zeros(1, dtype=torch.int32, device=dev) if check else None
    dummy = x  # never dereferenced when its constexpr flag is off
    _nll_kernel[(grid,)](
        x, t, v, go if go is not None else dummy, loss if loss is not None else dummy,
        gx if gx is not None else dummy, gt if gt is not None else dummy,
        gvp if gvp is not None else dummy, part if part is not None else dummy,
        neg if neg is not None else torch.empty(1, dtype=torch.int32, device=dev),
        A, B, C, n_cblk, n_bsplit, b_per_split, *_hilo(eps), *_hilo(beta), *_hilo(_HALF_LOG_2PI if full else 0.0),
        N if (red == 1 and go is None) else 1,
        LOGV=log_var, BETA=beta != 0.0, CHECK_NEG=check, W_LOSS=w_loss, RED=red != 0,
        HAS_GO=go is not None, W_GX=gx is not None, W_GT=gt is not None, W_GV=gvp is not None,
        GV_STRIDE=A * C, CDT=_tl_cdt(dt), BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, num_warps=warps)
    if gvp is not None and n_bsplit > 1:
        gv = gvp.view(n_bsplit, A * C).sum(0).to(dt)
    if red != 0:
        total = part.sum()
        loss = (total / N if red == 1 else total).to(dt)
    empty = x.new_empty(0)
    return (loss, gx if gx is not None else empty, gt if gt is not None else empty,
            gv if gv is not None else empty, neg if neg is not None else torch.zeros((), dtype=torch.int32))


def _triton_forward(x, t, v, A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v):
    grad = red != 0 and (need_x or need_t or need_v)
    return _triton_launch(x, t, v, None, A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v, grad)


def _triton_backward(go, x, t, v, A, B, C, full, eps, log_var, beta, need_x, need_t, need_v):
    _, gx, gt, gv, _ = _triton_launch(x, t, v, go, A, B, C, full, eps, log_var, beta, 0,
                                      need_x, need_t, need_v, True)
    return gx, gt, gv



if _HAS_TRITON:
    _dispatch.register("gaussian_nll", "triton")(_Kernels(forward=_triton_forward, backward=_triton_backward))


# ---- torch: the formula on the flat plan ------------------------------------------------------
def _torch_terms(x, t, v, A, B, C, full, eps, log_var, beta):
    """(d, inv, lg, w, l) in the accumulation dtype (float32 for half inputs), viewed [A, B, C]."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xa, ta, va = x.view(A, B, C).to(acc), t.view(A, B, C).to(acc), v.view(A, 1, C).to(acc)
    if log_var:
        lg, inv = va, torch.exp(-va)
    else:
        vc = va.clamp(min=eps)  # NaN stays NaN, like torch
        lg, inv = torch.log(vc), 1.0 / vc
    w = torch.exp(beta * lg) if beta != 0.0 else None
    d = xa - ta
    r2 = d * d * inv
    l = 0.5 * (lg + r2) + (_HALF_LOG_2PI if full else 0.0)
    if w is not None:
        l = w * l
    return d, inv, w, r2, l


def _torch_grads(d, inv, w, r2, f, log_var, need_x, need_t, need_v, dt):
    wi = inv if w is None else w * inv
    gi = wi * d * f if (need_x or need_t) else None
    gx = gi.to(dt).reshape(-1) if need_x else None
    gt = (-gi).to(dt).reshape(-1) if need_t else None
    gv = None
    if need_v:
        gvv = 0.5 * (1.0 - r2) * f * ((1.0 if w is None else w) if log_var else wi)
        gv = gvv.sum(1).to(dt).reshape(-1)
    return gx, gt, gv


def _torch_forward(x, t, v, A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v):
    dt, N = x.dtype, x.numel()
    d, inv, w, r2, l = _torch_terms(x, t, v, A, B, C, full, eps, log_var, beta)
    if red == 0:
        loss = l.to(dt).reshape(-1)
    else:
        loss = (l.sum() / N if red == 1 else l.sum()).to(dt)
    gx = gt = gv = None
    if red != 0 and (need_x or need_t or need_v):
        gx, gt, gv = _torch_grads(d, inv, w, r2, 1.0 / N if red == 1 else 1.0, log_var, need_x, need_t, need_v, dt)
    neg = (v < 0).any() if not log_var else torch.zeros((), dtype=torch.bool, device=x.device)
    empty = x.new_empty(0)
    return loss, *(g if g is not None else empty for g in (gx, gt, gv)), neg


def _torch_backward(go, x, t, v, A, B, C, full, eps, log_var, beta, need_x, need_t, need_v):
    d, inv, w, r2, _ = _torch_terms(x, t, v, A, B, C, full, eps, log_var, beta)
    f = go.view(A, B, C).to(d.dtype)
    gx, gt, gv = _torch_grads(d, inv, w, r2, f, log_var, need_x, need_t, need_v, x.dtype)
    empty = x.new_empty(0)
    return tuple(g if g is not None else empty for g in (gx, gt, gv))



_dispatch.register("gaussian_nll", "torch")(_Kernels(forward=_torch_forward, backward=_torch_backward))


def _scale(grads, grad_out):
    """grads *= grad_output (0-d), in place: the gradients of the fused forward pass."""
    if type(grad_out) is not torch.Tensor:  # a traced tensor (torch.compile's backward graph)
        return [g * grad_out.to(g.dtype) for g in grads]
    if grad_out.device.type == "cpu":  # a CPU scalar: reading it is free
        f = float(grad_out)
        if f != 1.0:
            for g in grads:
                g.mul_(f)
    elif _HAS_TRITON and grad_out.device.type == "cuda":  # on device, skipped there when it is 1
        go = grad_out.reshape(1)
        for g in grads:
            n = g.numel()
            if n:
                _scale_kernel[(triton.cdiv(n, 4096),)](g.view(-1), go, n, CDT=_tl_cdt(g.dtype), BLOCK=4096,
                                                       num_warps=8)
    else:
        for g in grads:
            g.mul_(grad_out.to(g.dtype))
    return grads


# ----------------------------------------------------------------------------------------------
# the op fastgen::gaussian_nll_loss and its internal ops
# ----------------------------------------------------------------------------------------------
def _check_neg(neg, mode: int, loss, device) -> torch.Tensor:
    if mode == CHECK_OFF:
        return loss
    if mode == CHECK_RAISE or device.type == "cpu":
        if bool(neg):  # the one host read of the call (a sync on GPU)
            raise ValueError("var has negative entry/entries")
        return loss
    return torch.where(neg.reshape(-1)[0] != 0, torch.full_like(loss, float("nan")), loss)


def _run_forward(input, target, var, full, eps, reduction, log_var, beta, check_var, need=(False, False, False)):
    """Loss (and, for "mean" / "sum", the requested gradients in the inputs' shapes and dtypes,
    else 0-element tensors) on the backend that fastgen._dispatch selects now."""
    if reduction not in _RED:
        raise ValueError(f"{reduction} is not valid: reduction must be 'none', 'mean' or 'sum'")
    red = _RED[reduction]
    try:
        out_shape = _broadcast_shape(input, target, var)
    except _ShapeError:
        if check_var != CHECK_OFF and _any_negative(var, log_var):  # torch checks the sign of var first
            raise ValueError("var has negative entry/entries") from None
        raise
    dt = _result_dtype(input, target, var)
    need = tuple(bool(n) and red != 0 for n in need)
    if math.prod(out_shape) == 0:  # empty: torch's values (nan mean, 0 sum, empty "none")
        loss = _ref.nll_formula(input.to(dt), target.to(dt), var.to(dt), full, eps, reduction, log_var, beta)
        grads = [torch.zeros_like(a) if n else a.new_empty(0) for a, n in zip((input, target, var), need)]
        return (loss.clone(), *grads)
    x, t, v, (A, B, C) = _plan(input, target, var, out_shape, dt)
    loss, gx, gt, gv, neg = _dispatch.run("gaussian_nll", ("forward", x, t, v, A, B, C, bool(full), float(eps),
                                                          bool(log_var), float(beta), red, *need),
                                          device_type=input.device.type)
    loss = _check_neg(neg, check_var if not log_var else CHECK_OFF, loss, input.device)
    grads = [_grad_like(g, a, out_shape) if n else a.new_empty(0)
             for g, a, n in zip((gx, gt, gv), (input, target, var), need)]
    return (loss.view(out_shape) if red == 0 else loss, *grads)


def _loss_fake(input, target, var, full, eps, reduction, log_var, beta, check_var):
    if reduction not in _RED:
        raise ValueError(f"{reduction} is not valid: reduction must be 'none', 'mean' or 'sum'")
    out_shape = _broadcast_shape(input, target, var)
    dt = _result_dtype(input, target, var)
    return input.new_empty(out_shape if reduction == "none" else (), dtype=dt)


def _loss_impl(input, target, var, full, eps, reduction, log_var, beta, check_var):
    return _run_forward(input, target, var, full, eps, reduction, log_var, beta, check_var)[0]


def _fused_impl(input, target, var, full, eps, reduction, log_var, beta, check_var, need_input, need_target,
                need_var):
    """Forward pass of reduction "mean" / "sum" that also writes the gradients of the loss for the
    inputs that need them (in their shapes and dtypes; 0-element tensors for the others)."""
    return _run_forward(input, target, var, full, eps, reduction, log_var, beta, check_var,
                        (need_input, need_target, need_var))


def _fused_fake(input, target, var, full, eps, reduction, log_var, beta, check_var, need_input, need_target,
                need_var):
    loss = _loss_fake(input, target, var, full, eps, reduction, log_var, beta, check_var)
    red = reduction != "none"
    return (loss, *(a.new_empty(a.shape if (n and red) else (0,)) for a, n in
                    zip((input, target, var), (need_input, need_target, need_var))))


def _backward_impl(grad_out, input, target, var, full, eps, log_var, beta, need_input, need_target, need_var):
    """Fused backward of reduction "none": grad_out of the broadcast shape -> the gradients for
    input, target and var (their shapes and dtypes; 0-element tensors where not requested). Not
    differentiable: used only when :func:`fastgen._compile.fast_backward`."""
    need = (need_input, need_target, need_var)
    out_shape = _broadcast_shape(input, target, var)
    if math.prod(out_shape) == 0:
        return tuple(torch.zeros_like(a) if n else a.new_empty(0) for a, n in zip((input, target, var), need))
    dt = _result_dtype(input, target, var)
    x, t, v, (A, B, C) = _plan(input, target, var, out_shape, dt)
    go = grad_out.to(dt).expand(out_shape).contiguous().view(-1)
    grads = _dispatch.run("gaussian_nll", ("backward", go, x, t, v, A, B, C, bool(full), float(eps), bool(log_var),
                                           float(beta), *need), device_type=input.device.type)
    return tuple(_grad_like(g, a, out_shape) if n else a.new_empty(0)
                 for g, a, n in zip(grads, (input, target, var), need))


def _backward_fake(grad_out, input, target, var, full, eps, log_var, beta, need_input, need_target, need_var):
    return tuple(a.new_empty(a.shape if n else (0,)) for a, n in
                 zip((input, target, var), (need_input, need_target, need_var)))


# internal ops (no autograd: they run inside the public op's autograd kernel, below autograd)
_FUSED = _compile.define(
    "_gaussian_nll_loss_fused",
    "(Tensor input, Tensor target, Tensor var, bool full, float eps, str reduction, bool log_var, float beta, "
    "int check_var, bool need_input, bool need_target, bool need_var) -> (Tensor, Tensor, Tensor, Tensor)",
    _fused_impl, fake=_fused_fake)
_BACKWARD = _compile.define(
    "_gaussian_nll_loss_backward",
    "(Tensor grad_out, Tensor input, Tensor target, Tensor var, bool full, float eps, bool log_var, float beta, "
    "bool need_input, bool need_target, bool need_var) -> (Tensor, Tensor, Tensor)",
    _backward_impl, fake=_backward_fake)


def _below_autograd(op, *args):
    # (the callers run where no gradient flows: the forward of the autograd kernel, a
    # non-differentiable backward)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


# ---- the differentiable formula (double backward, forward-mode AD, torch.func) ----------------
def _st_clamp(v, eps):
    """max(v, eps) whose derivatives of every order pass straight through the clamp (torch clamps
    a clone under no_grad: the same first derivative). Exactly the clamped value: the
    straight-through term is an exact zero (0 where v is not finite)."""
    zero = torch.where(torch.isfinite(v), v - v.detach(), torch.zeros_like(v))
    return v.detach().clamp(min=eps) + zero


def _formula_coefs(x, t, v, eps, log_var, beta):
    """(dl/dinput, dl/dvar) per element of the broadcast shape, with plain differentiable torch
    ops (dl/dtarget = -dl/dinput). x, t, v in the result dtype."""
    d = x - t
    if log_var:
        inv = torch.exp(-v)
        gi, gv = d * inv, 0.5 * (1.0 - d * d * inv)
        w = torch.exp(beta * v.detach()) if beta != 0.0 else None
    else:
        vc = _st_clamp(v, eps)
        inv = 1.0 / vc
        gi = d * inv
        gv = 0.5 * inv * (1.0 - d * gi)
        w = vc.detach() ** beta if beta != 0.0 else None
    if w is not None:  # beta-NLL: the weight stop_grad(var) ** beta is a constant
        gi, gv = w * gi, w * gv
    return gi, gv


class _NLLFunction(_compile.OpFunction):
    """Autograd kernel of fastgen::gaussian_nll_loss (arguments: the op's, then the caller's grad
    mode, appended by the autograd kernel: ``_compile.define(..., pass_grad_mode=True)``)."""

    @staticmethod
    def forward(ctx, input, target, var, full, eps, reduction, log_var, beta, check_var, grad_on):
        red = _RED.get(reduction, -1)
        need = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        ctx.args = (full, eps, reduction, log_var, beta)
        ctx.stash = None
        ctx.save_for_backward(input, target, var)
        ctx.save_for_forward(input, target, var)
        if grad_on and red > 0 and any(need) and not torch._C._are_functorch_transforms_active():
            # gradients in the forward pass (fast path; not under vmap: the fused op has no vmap rule)
            loss, *grads = _below_autograd(_FUSED, input, target, var, full, eps, reduction, log_var, beta, check_var,
                                           *need)
            ctx.stash = grads
        elif torch._C._are_functorch_transforms_active():
            # Function.apply runs forward with grad mode and forward grad off, but the op below
            # this level must still be recorded by the outer torch.func levels (the output of a
            # vjp / jvp differentiated again, jacrev(grad(f))): turn both back on, as
            # torch._functorch.autograd_function does (and fastgen._compile.OpFunction).
            with torch.enable_grad(), _set_fwd_grad_enabled(True), torch._C._AutoDispatchBelowAutograd():
                loss = _NLLFunction.op(input, target, var, full, eps, reduction, log_var, beta, check_var)
        else:
            with torch._C._AutoDispatchBelowAutograd():
                loss = _NLLFunction.op(input, target, var, full, eps, reduction, log_var, beta, check_var)
        # the fused backward passes run on the forward's backend: use_backend / FASTGEN_BACKEND may
        # have changed by then (None: "auto")
        ctx.backend = _dispatch._override("gaussian_nll")
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        input, target, var = ctx.saved_tensors
        full, eps, reduction, log_var, beta = ctx.args
        need = tuple(bool(n) for n in ctx.needs_input_grad[:3])
        stash, ctx.stash = ctx.stash, None  # hand the buffers over: autograd may keep them as .grad
        if _compile.fast_backward(grad_out):
            with _dispatch.use_backend(ctx.backend, "gaussian_nll") if ctx.backend else contextlib.nullcontext():
                if reduction != "none":
                    if stash is None:  # a second backward (retain_graph=True): recompute them
                        stash = _below_autograd(_FUSED, input, target, var, full, eps, reduction, log_var, beta,
                                                CHECK_OFF, *need)[1:]
                    grads = _scale([g for g, n in zip(stash, need) if n], grad_out)
                    it = iter(grads)
                    grads = [next(it) if n else None for n in need]
                else:
                    grads = _below_autograd(_BACKWARD, grad_out, input, target, var, full, eps, log_var, beta, *need)
        else:
            grads = _formula_backward(grad_out, input, target, var, eps, reduction, log_var, beta, need)
        return (*(g if n else None for g, n in zip(grads, need)), None, None, None, None, None, None, None)

    @staticmethod
    def jvp(ctx, d_input, d_target, d_var, *_):
        input, target, var = ctx.saved_tensors
        full, eps, reduction, log_var, beta = ctx.args
        dt = _result_dtype(input, target, var)
        gi, gv = _formula_coefs(input.to(dt), target.to(dt), var.to(dt), eps, log_var, beta)
        out = None
        for tan, coef in ((d_input, gi), (d_target, -gi), (d_var, gv)):
            if tan is not None:
                term = coef * tan.to(dt)
                out = term if out is None else out + term
        out_shape = _broadcast_shape(input, target, var)
        if out is None:
            out = torch.zeros(out_shape, dtype=dt, device=input.device)
        elif out.shape != out_shape:
            out = out.expand(out_shape)
        if reduction == "mean":
            return out.sum() / math.prod(out_shape)
        if reduction == "sum":
            return out.sum()
        return out.contiguous()


def _formula_backward(grad_out, input, target, var, eps, reduction, log_var, beta, need):
    dt = _result_dtype(input, target, var)
    out_shape = _broadcast_shape(input, target, var)
    gi, gv = _formula_coefs(input.to(dt), target.to(dt), var.to(dt), eps, log_var, beta)
    g = grad_out.to(dt)
    if reduction == "mean":
        g = g / math.prod(out_shape)
    out = []
    for a, coef, n in ((input, gi, need[0]), (target, -gi, need[1]), (var, gv, need[2])):
        if not n:
            out.append(None)
            continue
        ga = g * coef
        if ga.shape != out_shape:
            ga = ga.expand(out_shape)
        out.append(ga.sum_to_size(a.shape).to(a.dtype))
    return out


def _vmap_rule(info, in_dims, input, target, var, full, eps, reduction, log_var, beta, check_var):
    """torch.func.vmap: one call of the op (reduction "none") on the batched shape, then the
    per-sample mean / sum. Unbatched arguments get a leading dimension of size 1 (broadcast, not
    copied)."""
    ts = (input, target, var)
    nd = max(a.dim() - (d is not None) for a, d in zip(ts, in_dims[:3]))
    moved = []
    for a, d in zip(ts, in_dims[:3]):
        a = a.unsqueeze(0) if d is None else a.movedim(d, 0)
        pad = nd - (a.dim() - 1)
        moved.append(a.reshape(a.shape[0], *(1,) * pad, *a.shape[1:]) if pad else a)
    out = gaussian_nll_loss_op(*moved, full, eps, "none", log_var, beta, check_var)
    if reduction == "none":
        return out, 0
    if reduction not in _RED:
        raise ValueError(f"{reduction} is not valid: reduction must be 'none', 'mean' or 'sum'")
    flat = out.reshape(out.shape[0], -1)
    return (flat.mean(1) if reduction == "mean" else flat.sum(1)), 0


gaussian_nll_loss_op = _compile.define(
    "gaussian_nll_loss",
    # (no default values: the dispatcher drops trailing arguments equal to their default before it
    # calls a Python kernel)
    "(Tensor input, Tensor target, Tensor var, bool full, float eps, str reduction, bool log_var, float beta, "
    "int check_var) -> Tensor",
    _loss_impl, fake=_loss_fake, autograd=_NLLFunction, vmap=_vmap_rule,
    pass_grad_mode=True)  # the fused gradients are computed only when grad mode is on


# ----------------------------------------------------------------------------------------------
# public
# ----------------------------------------------------------------------------------------------
def gaussian_nll_loss(input, target, var, full=False, eps=1e-6, reduction="mean", *, log_var=False, beta=0.0,
                      check_var=True):
    r"""Gaussian negative log-likelihood: a drop-in for ``torch.nn.functional.gaussian_nll_loss``.

    Per element, with :math:`v = \max(\mathrm{var}, \epsilon)` (or :math:`v = e^{\mathrm{var}}`
    when ``log_var``):

    .. math:: \ell = \operatorname{sg}(v)^{\beta}\left(\tfrac12\left(\log v + \frac{(\mathrm{input}
              - \mathrm{target})^2}{v}\right) + [\mathrm{full}]\,\tfrac12\log 2\pi\right)

    then the mean, the sum, or nothing. Nix & Weigend 1994; beta-NLL: Seitzer et al., ICLR 2022,
    eq. 5 (sg: stop-gradient). With ``log_var=False`` and ``beta=0`` the values and gradients
    are torch's (gradient straight through the eps clamp).

    Args:
        input: expectation, any shape ``(*)``; float32 / float16 / bfloat16 / float64.
        target: sample, same shape as input or broadcastable with it (may be integer-typed).
        var: variance, a tensor of input's shape, or with one dimension fewer, or with exactly one
            dimension of size 1 (homoscedastic), or a Python float. Log-variance when ``log_var``.
        full: add the constant :math:`\tfrac12\log 2\pi` per element.
        eps: lower clamp of var (not applied with ``log_var``); every derivative ignores the clamp.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        log_var: the third argument is :math:`\log \mathrm{var}` (no clamp, no sign check).
        beta: beta-NLL exponent >= 0 (0: plain NLL; 0.5 is the paper's recommendation).
        check_var: raise ValueError for a negative entry of a var tensor (torch's check, done
            inside the op, so also under ``torch.func.vmap``). It is the one host synchronisation
            of the op on GPU; ``check_var=False`` (or ``log_var=True``) skips it, so the call can
            be captured in a CUDA graph. Under ``torch.compile`` the check never breaks the graph:
            on CPU it still raises, on GPU a negative var makes the loss NaN instead (on device,
            no sync).

    Returns:
        a 0-d tensor (mean / sum) or a tensor of the broadcast shape (``"none"``), in the dtype
        torch's formula gives (float16 inputs: float16, accumulated in float32).

    Raises:
        ValueError: negative var ("var has negative entry/entries"), var of incorrect size,
            an invalid reduction, beta < 0, inputs on different devices.
        RuntimeError (also a ValueError): target not broadcastable with input; the message
            contains torch's ("The size of tensor a (3) must match the size of tensor b (2) at
            non-singleton dimension 2").
        TypeError: input / target not tensors, var neither a tensor nor a float, non-floating
            input or var, non-string reduction, non-numeric eps / beta.

    Autograd and torch.func: one custom op, ``torch.ops.fastgen.gaussian_nll_loss``, in eager
    mode and under ``torch.compile(fullgraph=True)`` / ``torch.export`` (fake kernel; the backend
    is chosen by fastgen._dispatch when it runs). Gradients for input, target and var; double
    backward and forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``),
    ``torch.func.vmap`` (one launch on the batched shape), ``vmap(grad(f))`` per-sample gradients,
    ``jacrev`` / ``jacfwd`` / ``hessian``. In a plain ``backward()`` the fused kernels give the
    gradients (computed in the forward pass for "mean" / "sum"); with ``create_graph=True`` or
    under a torch.func transform a differentiable plain-torch formula does. Autocast does not
    recast the inputs: float16 / bfloat16 are read as they are, accumulated in float32, and the
    result has the promoted input dtype. Deterministic: the same inputs give bitwise the same loss
    and gradients on every backend (fixed-order reductions, no float atomics).
    """
    if has_torch_function_variadic(input, target, var):
        return handle_torch_function(gaussian_nll_loss, (input, target, var), input, target, var, full=full,
                                     eps=eps, reduction=reduction, log_var=log_var, beta=beta,
                                     check_var=check_var)
    log_var = bool(log_var)
    var = _check_args(input, target, var, full, eps, reduction, log_var, beta)
    if not check_var or log_var:
        mode = CHECK_OFF
    else:
        mode = CHECK_ON_DEVICE if _compile.is_compiling() else CHECK_RAISE
    return gaussian_nll_loss_op(input, target, var, bool(full), float(eps), reduction, log_var, float(beta), mode)
