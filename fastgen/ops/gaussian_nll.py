"""gaussian_nll_loss: a fused, drop-in torch.nn.functional.gaussian_nll_loss.

Backends (fastgen._dispatch op "gaussian_nll"):

* ``torch``: the plain formula of fastgen/reference/gaussian_nll.py (torch's own, op for op).
* ``cpu``: fastgen._C (csrc/cpu/gaussian_nll.cpp): one OpenMP pass over memory.
* ``triton``: the Triton kernel below (GPU; on CPU under TRITON_INTERPRET=1).

The two fused backends share one plan. The broadcast shape of (input, target, var) is viewed as
[A, B, C] with var [A, C] broadcast over B: per-element var is (1, 1, N), var [..., 1] or one
dimension fewer is (rows, D, 1), a size-1 dimension in the middle of var ([4, 1, 32, 32] for
input [4, 3, 32, 32]) is (4, 3, 1024). The kernels find var by index arithmetic, never by
expanding it. When grad is enabled and the reduction is "mean" or "sum", the forward pass also
writes the gradients for input, target (only when it requires grad) and var, in the same pass
(Liger-Kernel style); backward scales them by grad_output (nothing to do when it is 1: the GPU
scale kernel exits early on device). For reduction "none", backward is one fused pass with the
per-element grad_output.

Host synchronisation: the negative-var check of torch needs the host. The fused kernels fold it
into their pass (a flag), and the wrapper reads that flag once per call: that read is the one
sync (with ``log_var=True`` there is no check and no sync). Reductions finish on the device.
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import torch
from torch.autograd.function import once_differentiable
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


class _ShapeError(ValueError, RuntimeError):
    """Raised when target does not broadcast with input: a ValueError (fastgen's rule for bad
    input) that is also the RuntimeError torch raises there."""


# ----------------------------------------------------------------------------------------------
# argument checks (torch's order: var type, negative var, var size, reduction)
# ----------------------------------------------------------------------------------------------
def _is_real_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _any_negative(var, log_var: bool) -> bool:
    # (error paths only; under torch.compile the other error is raised: no data-dependent read)
    return (isinstance(var, torch.Tensor) and not log_var and var.numel() > 0 and var.device.type != "meta"
            and not _compile.is_compiling()
            and not var.is_complex() and bool(torch.any(var < 0)))


def _fail(exc: Exception, var, log_var: bool):
    """Raise exc, unless var has a negative entry: torch checks that first."""
    if _any_negative(var, log_var):
        raise ValueError("var has negative entry/entries")
    raise exc


def _check_args(input, target, var, full, eps, reduction, log_var, beta):
    """Validate everything but the sign of a var tensor (folded into the kernels). Returns var
    as a tensor resolved to torch's shape rule, or a float."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if isinstance(var, float):  # torch accepts a Python float (not an int) as a homoscedastic var
        if var < 0 and not log_var:
            raise ValueError("var has negative entry/entries")
        var = float(var)
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
    return var


def _result_dtype(input, target, var) -> torch.dtype:
    """The dtype torch's formula gives (type promotion, 0-dim rules included)."""
    vdt = input.dtype if isinstance(var, float) else var.dtype
    if input.dtype == target.dtype == vdt:
        return vdt
    meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")  # noqa: E731
    i, t = meta(input), meta(target)
    v = var * torch.ones_like(i) if isinstance(var, float) else meta(var)
    return (0.5 * (torch.log(v) + (i - t) ** 2 / v)).dtype


def _broadcast_shape(input, target, var) -> torch.Size:
    shapes = [input.shape, target.shape] + ([] if isinstance(var, float) else [var.shape])
    if all(s == shapes[0] for s in shapes[1:]):
        return shapes[0]
    nd = max(len(s) for s in shapes)
    out = [1] * nd
    for s in shapes:  # numpy broadcasting (torch.broadcast_shapes costs ~100 us a call)
        for i, d in enumerate(s, nd - len(s)):
            if d != out[i]:
                if out[i] != 1 and d != 1:
                    raise _ShapeError(f"target of shape {tuple(target.shape)} does not broadcast with "
                                      f"input of shape {tuple(input.shape)} (var {tuple(getattr(var, 'shape', ()))})")
                if d != 1:
                    out[i] = d
    return torch.Size(out)


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


# ----------------------------------------------------------------------------------------------
# backends
# ----------------------------------------------------------------------------------------------
@_dispatch.register("gaussian_nll", "torch")
def _torch_impl(input, target, var, full, eps, reduction, log_var, beta, check_var=True):
    """Plain formula (torch's, op for op); checks the sign of var on the host like torch."""
    if isinstance(var, float):
        var = var * torch.ones_like(input)
    elif check_var and not log_var and torch.any(var < 0):
        raise ValueError("var has negative entry/entries")
    return _ref.nll_formula(input, target, var, full, eps, reduction, log_var, beta)


class _FusedNLL(torch.autograd.Function):
    """x, t [A*B*C] and v [A*C] contiguous, one dtype; k: the backend's kernels."""

    @staticmethod
    def forward(ctx, x, t, v, k, A, B, C, full, eps, log_var, beta, red, out_shape, grad_on, check_var):
        # needs_input_grad is set under torch.no_grad() too: grad_on is the caller's grad mode
        need_x, need_t, need_v = (bool(n) and grad_on for n in ctx.needs_input_grad[:3])
        loss, gx, gt, gv, neg = k.forward(x, t, v, A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v)
        if check_var and not log_var and bool(neg):  # the one host read of the call (a sync on GPU)
            raise ValueError("var has negative entry/entries")
        ctx.k, ctx.plan = k, (A, B, C, full, eps, log_var, beta, red)
        ctx.need = (need_x, need_t, need_v)
        ctx.stash = (gx, gt, gv) if red != 0 else None
        ctx.save_for_backward(x, t, v)
        return loss.view(out_shape) if red == 0 else loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        A, B, C, full, eps, log_var, beta, red = ctx.plan
        need_x, need_t, need_v = ctx.need
        k = ctx.k
        stash, ctx.stash = ctx.stash, None  # hand the buffers over: autograd may keep them as .grad
        if red == 0:
            x, t, v = ctx.saved_tensors
            go = grad_out.to(x.dtype).contiguous().view(-1)
            gx, gt, gv = k.backward(go, x, t, v, A, B, C, full, eps, log_var, beta, need_x, need_t, need_v)
        else:
            if stash is None:  # a second backward (retain_graph=True): recompute them
                x, t, v = ctx.saved_tensors
                _, gx, gt, gv, _ = k.forward(x, t, v, A, B, C, full, eps, log_var, beta, red,
                                             need_x, need_t, need_v)
            else:
                gx, gt, gv = stash
            k.scale([g for g, n in ((gx, need_x), (gt, need_t), (gv, need_v)) if n], grad_out)
        return (gx if need_x else None, gt if need_t else None, gv if need_v else None) + (None,) * 12


def _plan(input, target, var):
    """Flat contiguous (x, t, v) in the result dtype and the (A, B, C) plan (see module doc)."""
    out_shape = _broadcast_shape(input, target, var)
    N = math.prod(out_shape)
    dt = _result_dtype(input, target, var)
    x = input.to(dt)
    t = target.to(dt)
    if isinstance(var, float):
        v = torch.full((1,), var, dtype=dt, device=input.device)
        plan = (1, N, 1)
    else:
        v = var.to(dt)
        plan = _var_plan(v.shape, out_shape)
        if plan is None:  # broadcast dims of var not contiguous (only when target widens input)
            v = v.expand(out_shape)
            plan = (1, 1, N)
    if x.shape != out_shape:  # target wider than input (rare): autograd sums the grad back
        x = x.expand(out_shape)
    if t.shape != out_shape:
        t = t.expand(out_shape)
    return x.contiguous().view(-1), t.contiguous().view(-1), v.contiguous().view(-1), plan, out_shape


def _fused(k, input, target, var, full, eps, reduction, log_var, beta, check_var=True):
    if math.prod(_broadcast_shape(input, target, var)) == 0:
        # empty: nothing to fuse (torch's formula gives nan / 0 / an empty tensor)
        return _torch_impl(input, target, var, full, eps, reduction, log_var, beta, check_var)
    x, t, v, (A, B, C), out_shape = _plan(input, target, var)
    return _FusedNLL.apply(x, t, v, k, A, B, C, bool(full), float(eps), bool(log_var), float(beta), _RED[reduction],
                           out_shape, torch.is_grad_enabled(), bool(check_var))


# ---- cpu: fastgen._C --------------------------------------------------------------------------
def _cpu_scale(grads, grad_out):
    g = float(grad_out)  # a CPU scalar: reading it is free
    if g != 1.0:
        for t in grads:
            t.mul_(g)


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


_CPU = SimpleNamespace(
    forward=lambda *a: _backend.ext_op("_gaussian_nll_kernel")(*a),
    backward=lambda *a: _backend.ext_op("_gaussian_nll_backward_kernel")(*a),
    scale=_cpu_scale,
)


@_dispatch.register("gaussian_nll", "cpu")
def _cpu_impl(input, target, var, full, eps, reduction, log_var, beta, check_var=True):
    return _fused(_CPU, input, target, var, full, eps, reduction, log_var, beta, check_var)


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


def _triton_scale(grads, grad_out):
    if not grads:
        return
    if grad_out.device.type != "cuda":  # interpreter on CPU: the host read is free
        _cpu_scale(grads, grad_out)
        return
    go = grad_out.reshape(1)
    BLOCK = 4096
    for g in grads:
        n = g.numel()
        _scale_kernel[(triton.cdiv(n, BLOCK),)](g, go, n, CDT=_tl_cdt(g.dtype), BLOCK=BLOCK, num_warps=8)


_TRITON = SimpleNamespace(forward=_triton_forward, backward=_triton_backward, scale=_triton_scale)


@_dispatch.register("gaussian_nll", "triton")
def _triton_impl(input, target, var, full, eps, reduction, log_var, beta, check_var=True):
    return _fused(_TRITON, input, target, var, full, eps, reduction, log_var, beta, check_var)


# ---- torch: the formula on the flat plan, for the custom op ------------------------------------
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


_KERNELS = {"cpu": _CPU, "torch": SimpleNamespace(forward=_torch_forward, backward=_torch_backward)}
if _HAS_TRITON:
    _KERNELS["triton"] = _TRITON


def _kernels(device_type: str):
    """The kernels of the backend fastgen._dispatch selects now (use_backend / FASTGEN_BACKEND)."""
    name, _ = _dispatch.select("gaussian_nll", "auto", device_type)
    return _KERNELS[name]


# ----------------------------------------------------------------------------------------------
# custom ops: what torch.compile sees (fake kernels + registered autograd; see fastgen/_compile.py)
# ----------------------------------------------------------------------------------------------
def _out(t, need, like):
    return t if need else _compile.fresh_empty(like)


@_compile.op("gaussian_nll_loss",
             "(Tensor x, Tensor t, Tensor v, SymInt A, SymInt B, SymInt C, bool full, float eps, "
             "bool log_var, float beta, int red, bool need_x, bool need_t, bool need_v, "
             "bool check_var) -> (Tensor, Tensor, Tensor, Tensor)")
def _op_forward(x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, A: int, B: int, C: int, full: bool,
                eps: float, log_var: bool, beta: float, red: int, need_x: bool, need_t: bool, need_v: bool,
                check_var: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat plan (see module doc) -> (loss, grad_x, grad_t, grad_var): the gradients of the
    reduced loss (mean / sum) when requested, 0-element tensors otherwise and for "none".
    check_var: a negative var raises ValueError on CPU (no sync there) and makes the loss NaN
    on other devices (on device: no host sync, CUDA-graph safe)."""
    k = _kernels(x.device.type)
    loss, gx, gt, gv, neg = k.forward(x, t, v, A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v)
    if check_var and not log_var:
        if x.device.type == "cpu":
            if bool(neg):
                raise ValueError("var has negative entry/entries")
        else:
            loss = torch.where(neg.reshape(-1)[0] != 0, torch.full_like(loss, float("nan")), loss)
    grads = red != 0
    return (loss.clone() if loss is x else loss, _out(gx, grads and need_x, x), _out(gt, grads and need_t, x),
            _out(gv, grads and need_v, x))


@_op_forward.register_fake
def _(x, t, v, A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v, check_var):
    grads = red != 0
    loss = x.new_empty(x.shape) if red == 0 else x.new_empty(())
    return (loss, x.new_empty(x.shape if grads and need_x else (0,)), x.new_empty(x.shape if grads and need_t else (0,)),
            x.new_empty(v.shape if grads and need_v else (0,)))


@_compile.op("gaussian_nll_loss_backward",
             "(Tensor go, Tensor x, Tensor t, Tensor v, SymInt A, SymInt B, SymInt C, bool full, "
             "float eps, bool log_var, float beta, bool need_x, bool need_t, bool need_v) -> (Tensor, "
             "Tensor, Tensor)")
def _op_backward(go: torch.Tensor, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, A: int, B: int, C: int,
                 full: bool, eps: float, log_var: bool, beta: float, need_x: bool, need_t: bool,
                 need_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of reduction "none": go [A*B*C] -> (grad_x, grad_t, grad_var), 0-element where
    not requested."""
    k = _kernels(x.device.type)
    go = go.to(x.dtype).contiguous()
    gx, gt, gv = k.backward(go, x, t, v, A, B, C, full, eps, log_var, beta, need_x, need_t, need_v)
    return _out(gx, need_x, x), _out(gt, need_t, x), _out(gv, need_v, x)


@_op_backward.register_fake
def _(go, x, t, v, A, B, C, full, eps, log_var, beta, need_x, need_t, need_v):
    return (x.new_empty(x.shape if need_x else (0,)), x.new_empty(x.shape if need_t else (0,)),
            x.new_empty(v.shape if need_v else (0,)))


def _op_setup_context(ctx, inputs, output):
    x, t, v, A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v, _ = inputs
    ctx.plan = (A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v)
    if red == 0:
        ctx.save_for_backward(x, t, v)
    else:  # the gradients came with the forward pass: backward only scales them
        ctx.save_for_backward(*output[1:])


def _op_autograd(ctx, grad_loss, _gx, _gt, _gv):
    A, B, C, full, eps, log_var, beta, red, need_x, need_t, need_v = ctx.plan
    if red == 0:
        x, t, v = ctx.saved_tensors
        gx, gt, gv = _op_backward(grad_loss, x, t, v, A, B, C, full, eps, log_var, beta, need_x, need_t, need_v)
    else:
        gx, gt, gv = (g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)  # on device: no sync
    return (gx if need_x else None, gt if need_t else None, gv if need_v else None) + (None,) * 12


_op_forward.register_autograd(_op_autograd, setup_context=_op_setup_context)


def _via_custom_op(input, target, var, full, eps, reduction, log_var, beta, check_var=True):
    """The custom-op path (used under torch.compile; callable eagerly for tests). Arguments as
    after _check_args."""
    out_shape = _broadcast_shape(input, target, var)
    if math.prod(out_shape) == 0:  # empty: torch's formula (nan / 0 / an empty tensor)
        v = var * torch.ones_like(input) if isinstance(var, float) else var
        return _ref.nll_formula(input, target, v, full, eps, reduction, log_var, beta)
    x, t, v, (A, B, C), out_shape = _plan(input, target, var)
    grad_on = torch.is_grad_enabled()
    loss, _, _, _ = _op_forward(x, t, v, A, B, C, bool(full), float(eps), bool(log_var), float(beta),
                                _RED[reduction], grad_on and x.requires_grad, grad_on and t.requires_grad,
                                grad_on and v.requires_grad, bool(check_var))
    return loss.view(out_shape) if reduction == "none" else loss


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
        eps: lower clamp of var (not applied with ``log_var``); the gradient ignores the clamp.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"``.
        log_var: the third argument is :math:`\log \mathrm{var}` (no clamp, no sign check).
        beta: beta-NLL exponent >= 0 (0: plain NLL; 0.5 is the paper's recommendation).
        check_var: raise ValueError for a negative entry of a var tensor (torch's check). It is
            the one host synchronisation of the op on GPU; ``check_var=False`` (or
            ``log_var=True``) skips it, so the call can be captured in a CUDA graph. Under
            ``torch.compile`` the check never breaks the graph: on CPU it still raises, on
            GPU a negative var makes the loss NaN instead (on device, no sync).

    Returns:
        a 0-d tensor (mean / sum) or a tensor of the broadcast shape (``"none"``), in the dtype
        torch's formula gives (float16 inputs: float16, accumulated in float32).

    Raises:
        ValueError: negative var ("var has negative entry/entries"), var of incorrect size,
            an invalid reduction, beta < 0, inputs on different devices, target not broadcastable.
        TypeError: input / target not tensors, var neither a tensor nor a float, non-floating
            input or var, non-string reduction, non-numeric eps / beta.

    Gradients for input, target and var. The fused backends are differentiable once (no
    double backward). The negative-var check reads one flag on the host per call (one sync on
    GPU; none with ``log_var=True`` or ``check_var=False``).

    PyTorch integration: under ``torch.compile`` the call is the custom op
    ``torch.ops.fastgen.gaussian_nll_loss`` (fake kernel, registered autograd; the backend is
    still chosen by fastgen._dispatch when it runs): ``fullgraph=True`` works. Autocast does not
    recast the inputs: float16 / bfloat16 are read as they are, accumulated in float32, and
    the result has the promoted input dtype. Deterministic: the same inputs give bitwise the
    same loss and gradients on every backend (fixed-order reductions, no float atomics).
    """
    if has_torch_function_variadic(input, target, var):
        return handle_torch_function(gaussian_nll_loss, (input, target, var), input, target, var, full=full,
                                     eps=eps, reduction=reduction, log_var=log_var, beta=beta,
                                     check_var=check_var)
    log_var = bool(log_var)
    var = _check_args(input, target, var, full, eps, reduction, log_var, beta)
    _broadcast_shape(input, target, var)  # target must broadcast with input (every backend)
    if _compile.is_compiling():  # one opaque custom op: no graph break, backend chosen at run time
        return _via_custom_op(input, target, var, bool(full), float(eps), reduction, log_var, float(beta),
                              bool(check_var))
    _, impl = _dispatch.select("gaussian_nll", "auto", input.device.type)
    return impl(input, target, var, bool(full), float(eps), reduction, log_var, float(beta), bool(check_var))
