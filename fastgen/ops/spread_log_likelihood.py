"""spread_log_likelihood: the fused Monte-Carlo log-density of a spread model.

    out[n] = log (q*K)(y_n) ~ log( 1/S sum_s K_sigma(y_n - samples_s) )

the estimate of the spread model density used by spread-divergence training (Zhang, Gao, Agakov
& Barber 2019, arXiv 1811.08968, seed 001): samples = g(z_s) from the generator, y = data + noise.
K is the normalised Gaussian density (std sigma_j) or Laplace density (scale b_j = sigma_j) in D
dimensions.

Exactness: pairwise terms come from direct differences y_nj - samples_sj, so data far from the
origin keeps full accuracy (the ||y||^2 - 2 y.x + ||x||^2 expansion loses ~130 nats at offset 1e3
in float32). Memory: O((N + S) D): an online (flash-style) logsumexp over sample tiles, never an
N x S matrix (the torch backend holds N_chunk x S).

Backends (op ``"spread_log_likelihood"``): ``"cpu"`` (C++ fused forward + backward, OpenMP,
csrc/cpu/spread_log_likelihood.cpp), ``"triton"`` (fused forward + backward tiles, GPU or the
interpreter), ``"torch"`` (chunked direct differences with a hand-written chunked backward).
"""
from __future__ import annotations

import functools
import math

import torch

from .. import _backend, _compile, _dispatch
from .._dispatch import register
from .._validate import FLOAT_DTYPES, check_kind, check_same_device, check_sigma_values, check_tensor

try:  # Triton is optional
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["spread_log_likelihood"]

_KIND_ID = {"gaussian": 0, "laplace": 1}
_LOG2PI = math.log(2 * math.pi)


def _log_const(s: torch.Tensor, D: int, kind: int) -> torch.Tensor:
    """Normalising constant of log K: -sum_j log s_j - D/2 log 2 pi (Gaussian) or
    -sum_j log(2 s_j) (Laplace); s has 1 or D elements (1: the same scale in every dim)."""
    rep = D if s.numel() == 1 else 1
    if kind == 0:
        return -rep * torch.log(s).sum() - 0.5 * D * _LOG2PI
    return -rep * torch.log(2 * s).sum()


def _sigma_grad(G, tsum: torch.Tensor, s: torch.Tensor, D: int, kind: int) -> torch.Tensor:
    """grad wrt s from G = sum_n g_n and tsum[j] = sum_ns t_ns f(d_nsj) (f = d^2 or |d|)."""
    if s.numel() == 1:
        tsum = tsum.sum().reshape(1)
        G = G * D
    return -G / s + (tsum / s**3 if kind == 0 else tsum / s**2)


def _call(impl, method: str, *args):
    """A backend as registered with fastgen._dispatch: ``fn("forward" | "backward", *args)``."""
    return getattr(impl, method)(*args)


# ---------------------------------------------------------------------------------------------
# torch backend: chunked direct differences
# ---------------------------------------------------------------------------------------------
class _TorchImpl:
    @staticmethod
    def _chunks(N, S, D):
        sb = max(1, min(S, (1 << 21) // max(D, 1)))
        nb = max(1, min(N, (1 << 22) // (sb * max(D, 1)), (1 << 24) // S))
        return nb, sb

    @staticmethod
    def _scores(yc, x, s, kind, sb):
        # a[n, s] = log K(y_n - x_s) without the constant: [nb, S]
        parts = []
        for j in range(0, x.shape[0], sb):
            d = yc[:, None, :] - x[None, j:j + sb, :]
            if kind == 0:
                parts.append(-0.5 * (d / s).square().sum(-1))
            else:
                parts.append(-(d.abs() / s).sum(-1))
        return torch.cat(parts, 1)

    @classmethod
    def forward(cls, y, x, s, kind):
        N, D = y.shape
        S = x.shape[0]
        nb, sb = cls._chunks(N, S, D)
        lse = torch.cat([torch.logsumexp(cls._scores(y[i:i + nb], x, s, kind, sb), 1) for i in range(0, N, nb)])
        return lse + (_log_const(s, D, kind) - math.log(S))

    @classmethod
    def backward(cls, g, y, x, s, out, kind, ny, nx, ns):
        N, D = y.shape
        S = x.shape[0]
        nb, sb = cls._chunks(N, S, D)
        lse = out - (_log_const(s, D, kind) - math.log(S))
        inv = 1.0 / s**2 if kind == 0 else 1.0 / s
        gy = torch.empty_like(y) if ny else None
        gx = torch.zeros_like(x) if nx else None
        tsum = torch.zeros(D, dtype=torch.float64, device=y.device)  # the two sigma terms nearly cancel
        for i in range(0, N, nb):
            yc = y[i:i + nb]
            t = g[i:i + nb, None] * torch.exp(cls._scores(yc, x, s, kind, sb) - lse[i:i + nb, None])
            gyc = torch.zeros_like(yc)
            for j in range(0, S, sb):
                d = yc[:, None, :] - x[None, j:j + sb, :]
                u = t[:, j:j + sb, None] * (d if kind == 0 else torch.sign(d))
                if ny:
                    gyc -= u.sum(1)
                if nx:
                    gx[j:j + sb] += u.sum(0)
                if ns:
                    tsum += (u * d).sum((0, 1), dtype=torch.float64)
            if ny:
                gy[i:i + nb] = gyc * inv
        if nx:
            gx *= inv
        gs = _sigma_grad(g.sum(dtype=torch.float64), tsum, s.double(), D, kind).to(s.dtype) if ns else None
        return gy, gx, gs


register("spread_log_likelihood", "torch")(functools.partial(_call, _TorchImpl))


# ---------------------------------------------------------------------------------------------
# cpu backend (fastgen._C)
# ---------------------------------------------------------------------------------------------
@_backend.fake("_spread_log_likelihood_kernel")
def _(y, samples, sigma, kind):  # csrc/cpu/spread_log_likelihood.cpp: y [N, D], samples [S, D] -> [N]
    return y.new_empty((y.shape[0],))


@_backend.fake("_spread_log_likelihood_backward_kernel")
def _(g, y, samples, sigma, out, kind, need_y, need_samples, need_sigma):
    return (y.new_empty(y.shape if need_y else (0,)), y.new_empty(samples.shape if need_samples else (0,)),
            y.new_empty(sigma.shape if need_sigma else (0,)))


class _CppImpl:
    @staticmethod
    def forward(y, x, s, kind):
        return _backend.ext_op("_spread_log_likelihood_kernel")(y, x, s, kind)

    @staticmethod
    def backward(g, y, x, s, out, kind, ny, nx, ns):
        gy, gx, gs = _backend.ext_op("_spread_log_likelihood_backward_kernel")(g, y, x, s, out, kind, ny, nx, ns)
        return (gy if ny else None), (gx if nx else None), (gs if ns else None)


register("spread_log_likelihood", "cpu")(functools.partial(_call, _CppImpl))


# ---------------------------------------------------------------------------------------------
# triton backend: [BN x BS] tiles of direct differences, one dimension at a time (CUDA cores,
# exact), online logsumexp over sample tiles; backward recomputes the tiles (flash-style):
# a rows kernel (grad_y, grad_sigma partials) and a columns kernel (grad_samples).
# y and samples are passed transposed ([D, N], [D, S]) so that each dimension's slice is
# contiguous.
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _pair_scores(yT_ptr, xT_ptr, w_ptr, rows, cols, rmask, cmask, N, S, D,
                     KIND: tl.constexpr, PERDIM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr):
        # a[n, s] = -sum_j f(w_j (y_nj - x_sj)) (PERDIM) or -scale * sum_j f(y_nj - x_sj),
        # f = square (Gaussian) or abs (Laplace); -inf for padded samples
        acc = tl.zeros([BN, BS], dtype=yT_ptr.dtype.element_ty)  # float32, or float64
        yp = yT_ptr + rows  # running pointers: 64-bit addresses however large D * N
        xp = xT_ptr + cols
        for j in range(0, D):
            yj = tl.load(yp, mask=rmask, other=0.0)
            xj = tl.load(xp, mask=cmask, other=0.0)
            yp += N
            xp += S
            d = yj[:, None] - xj[None, :]
            if PERDIM:
                d = d * tl.load(w_ptr + j)
            if KIND == 0:
                acc += d * d
            else:
                acc += tl.abs(d)
        if PERDIM:
            a = -acc
        else:
            s0 = tl.load(w_ptr)  # the one-element sigma
            if KIND == 0:
                a = acc * (-0.5 / (s0 * s0))
            else:
                a = acc * (-1.0 / s0)
        return tl.where(cmask[None, :], a, float("-inf"))

    @triton.jit
    def _sll_fwd_kernel(yT_ptr, xT_ptr, w_ptr, lse_ptr, N, S, D,
                        KIND: tl.constexpr, PERDIM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        rmask = rows < N
        m = tl.full([BN], float("-inf"), dtype=yT_ptr.dtype.element_ty)
        l = tl.zeros([BN], dtype=yT_ptr.dtype.element_ty)
        for s0 in range(0, S, BS):
            cols = s0 + tl.arange(0, BS)
            cmask = cols < S
            a = _pair_scores(yT_ptr, xT_ptr, w_ptr, rows, cols, rmask, cmask, N, S, D,
                             KIND, PERDIM, BN, BS)
            m_new = tl.maximum(m, tl.max(a, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l = l * tl.exp(m - safe) + tl.sum(tl.exp(a - safe[:, None]), 1)
            m = m_new
        tl.store(lse_ptr + rows, m + tl.log(l), mask=rmask)

    @triton.jit
    def _pair_weights(yT_ptr, xT_ptr, w_ptr, lse_ptr, g_ptr, rows, cols, rmask, cmask, N, S, D,
                      KIND: tl.constexpr, PERDIM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr):
        # t[n, s] = g_n * softmax_s(a[n, :])[s] = g_n exp(a_ns - lse_n); 0 on padding
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        gr = tl.load(g_ptr + rows, mask=rmask, other=0.0)
        a = _pair_scores(yT_ptr, xT_ptr, w_ptr, rows, cols, rmask, cmask, N, S, D,
                         KIND, PERDIM, BN, BS)
        t = gr[:, None] * tl.exp(a - lse[:, None])
        return tl.where(rmask[:, None] & cmask[None, :], t, 0.0)

    @triton.jit
    def _weighted_diff(yp, xp, rmask, cmask, t, KIND: tl.constexpr):
        # (t * f'(d), d) for feature j, d[n, s] = y_nj - x_sj; f' = 2x / 2 (Gaussian) or sign (Laplace)
        yj = tl.load(yp, mask=rmask, other=0.0)
        xj = tl.load(xp, mask=cmask, other=0.0)
        d = yj[:, None] - xj[None, :]
        if KIND == 0:
            u = t * d
        else:
            u = t * tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        return u, d

    @triton.jit
    def _sll_bwd_rows_kernel(yT_ptr, xT_ptr, w_ptr, lse_ptr, g_ptr, gyT_ptr, part_ptr, N, S, D,
                             KIND: tl.constexpr, PERDIM: tl.constexpr, NEED_Y: tl.constexpr,
                             NEED_SIGMA: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr):
        # gyT[j, n] = sum_s t_ns f'(d_nsj) (raw, the caller scales), part[pid, j] = sum t f'(d) d
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        rmask = rows < N
        for s0 in range(0, S, BS):
            cols = s0 + tl.arange(0, BS)
            cmask = cols < S
            t = _pair_weights(yT_ptr, xT_ptr, w_ptr, lse_ptr, g_ptr, rows, cols, rmask, cmask, N, S, D,
                              KIND, PERDIM, BN, BS)
            yp = yT_ptr + rows
            xp = xT_ptr + cols
            gp = gyT_ptr + rows
            for j in range(0, D):
                u, d = _weighted_diff(yp, xp, rmask, cmask, t, KIND)
                if NEED_Y:
                    tl.store(gp, tl.load(gp, mask=rmask, other=0.0) + tl.sum(u, 1), mask=rmask)
                if NEED_SIGMA:
                    q = part_ptr + pid * D + j
                    tl.store(q, tl.load(q) + tl.sum(tl.sum(u * d, 1), 0))
                yp += N
                xp += S
                gp += N

    @triton.jit
    def _sll_bwd_cols_kernel(yT_ptr, xT_ptr, w_ptr, lse_ptr, g_ptr, gxT_ptr, N, S, D,
                             KIND: tl.constexpr, PERDIM: tl.constexpr, BN: tl.constexpr, BS: tl.constexpr):
        # gxT[j, s] = sum_n t_ns f'(d_nsj) (raw, the caller scales)
        pid = tl.program_id(0)
        cols = pid * BS + tl.arange(0, BS)
        cmask = cols < S
        for n0 in range(0, N, BN):
            rows = n0 + tl.arange(0, BN)
            rmask = rows < N
            t = _pair_weights(yT_ptr, xT_ptr, w_ptr, lse_ptr, g_ptr, rows, cols, rmask, cmask, N, S, D,
                              KIND, PERDIM, BN, BS)
            yp = yT_ptr + rows
            xp = xT_ptr + cols
            gp = gxT_ptr + cols
            for j in range(0, D):
                u, d = _weighted_diff(yp, xp, rmask, cmask, t, KIND)
                tl.store(gp, tl.load(gp, mask=cmask, other=0.0) + tl.sum(u, 0), mask=cmask)
                yp += N
                xp += S
                gp += S


def _weights(s: torch.Tensor, kind: int) -> torch.Tensor:
    """Per-dimension weights w ([D], PERDIM: a = -sum_j f(w_j d_j)), or the one-element sigma
    itself (the kernel computes scale = 1 / (2 s^2) or 1 / s from it: no host read)."""
    sd = s.detach()
    if s.numel() == 1:
        return sd.reshape(1).contiguous()
    return (math.sqrt(0.5) / sd if kind == 0 else 1.0 / sd).contiguous()


class _TritonImpl:
    @staticmethod
    def _blocks(device):
        import os

        if os.environ.get("TRITON_INTERPRET", "0") == "1" and device.type != "cuda":
            return 16, 16, 1
        return 64, 64, 4  # untuned (no GPU was available when this was written)

    @classmethod
    def _prep(cls, y, x, s, kind):
        return y.t().contiguous(), x.t().contiguous(), _weights(s, kind).to(y.dtype), s.numel() > 1

    @classmethod
    def forward(cls, y, x, s, kind):
        N, D = y.shape
        S = x.shape[0]
        yT, xT, w, perdim = cls._prep(y, x, s, kind)
        BN, BS, nw = cls._blocks(y.device)
        lse = torch.empty(N, dtype=y.dtype, device=y.device)
        _sll_fwd_kernel[(triton.cdiv(N, BN),)](yT, xT, w, lse, N, S, D, KIND=kind, PERDIM=perdim,
                                               BN=BN, BS=BS, num_warps=nw)
        return lse + (_log_const(s.detach(), D, kind) - math.log(S))

    @classmethod
    def backward(cls, g, y, x, s, out, kind, ny, nx, ns):
        N, D = y.shape
        S = x.shape[0]
        yT, xT, w, perdim = cls._prep(y, x, s, kind)
        BN, BS, nw = cls._blocks(y.device)
        lse = (out.detach() - (_log_const(s.detach(), D, kind) - math.log(S))).contiguous()
        gf = g.to(y.dtype).contiguous()
        inv = 1.0 / s.detach() ** 2 if kind == 0 else 1.0 / s.detach()
        gy = gx = gs = None
        if ny or ns:
            nb = triton.cdiv(N, BN)
            gyT = torch.zeros((D, N), dtype=y.dtype, device=y.device)
            part = torch.zeros((nb, D), dtype=y.dtype, device=y.device)
            _sll_bwd_rows_kernel[(nb,)](yT, xT, w, lse, gf, gyT, part, N, S, D, KIND=kind, PERDIM=perdim,
                                        NEED_Y=ny, NEED_SIGMA=ns, BN=BN, BS=BS, num_warps=nw)
            if ny:
                gy = (-(gyT.t() * inv)).to(y.dtype)
            if ns:
                tsum = part.double().sum(0)
                gs = _sigma_grad(g.sum(dtype=torch.float64), tsum, s.detach().double(), D, kind).to(s.dtype)
        if nx:
            gxT = torch.zeros((D, S), dtype=y.dtype, device=y.device)
            _sll_bwd_cols_kernel[(triton.cdiv(S, BS),)](yT, xT, w, lse, gf, gxT, N, S, D, KIND=kind,
                                                        PERDIM=perdim, BN=BN, BS=BS, num_warps=nw)
            gx = (gxT.t() * inv).to(x.dtype)
        return gy, gx, gs


register("spread_log_likelihood", "triton")(functools.partial(_call, _TritonImpl))


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
def _check_sigma(sigma, D: int, device, dtype, check_values: bool = True) -> torch.Tensor:
    """sigma -> a [1] or [D] tensor of the compute dtype (differentiable when sigma is).
    check_values=False skips the value check of a tensor sigma (a host read on CUDA)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
        raise TypeError(f"sigma must be a float or a floating-point tensor, got {type(sigma).__name__}")
    if not isinstance(sigma, torch.Tensor):
        v = float(sigma)
        if not (0 < v < math.inf):  # (no math.isfinite: dynamo with dynamic=True)
            raise ValueError(f"sigma must be finite and > 0, got {sigma!r}")
        return torch.full((1,), v, dtype=dtype, device=device)
    if sigma.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sigma must be a floating-point tensor, got {sigma.dtype}")
    if sigma.device != device:
        if sigma.dim() == 0 and sigma.device.type == "cpu":
            sigma = sigma.to(device)
        else:
            raise ValueError(f"sigma is on {sigma.device} but y is on {device}: all inputs must be on one device")
    if sigma.numel() == 1:
        s = sigma.reshape(1)
    elif sigma.dim() == 1 and sigma.shape[0] == D:
        s = sigma
    else:
        raise ValueError(f"sigma must be a float, a one-element tensor or a [D] = [{D}] tensor, "
                         f"got shape {tuple(sigma.shape)}")
    if check_values:
        _check_sigma_values(s)
    return s.to(dtype).contiguous()


def _check_sigma_values(s: torch.Tensor) -> None:
    check_sigma_values(s, allow_zero=False)


# ---------------------------------------------------------------------------------------------
# differentiable plain-torch backward and jvp (create_graph, torch.func): chunked over y rows
# ---------------------------------------------------------------------------------------------
_DIFF_CHUNK = 1 << 22  # elements of one [rows, S, D] block of pairwise differences


def _diff_blocks(y, x, s, kind):
    """Yields (rows, d, w, p) per block of y rows: d = y_n - x_s [nb, S, D], w = f'(d) / 2 for
    f = d^2 (d itself) or f = |d| (sign d), p = softmax_s of the log-kernel [nb, S]. Plain torch
    ops: differentiable (any order) and batchable."""
    N, D = y.shape
    S = x.shape[0]
    nb = max(1, _DIFF_CHUNK // max(1, S * D))
    for i in range(0, N, nb):
        d = y[i:i + nb, None, :] - x[None, :, :]
        if kind == 0:
            z = d / s
            a = -0.5 * (z * z).sum(-1)
            w = d
        else:
            a = -(d.abs() / s).sum(-1)
            w = torch.sign(d)
        yield slice(i, i + nb), d, w, torch.softmax(a, 1)


def _vjp_torch(g, y, x, s, kind, ny, nx, ns):
    """(grad_y, grad_samples, grad_sigma) of sum_n g_n out_n in differentiable torch ops (None
    where not needed). Memory: O(nb S D) temporaries per block (nb S D <= 2^22); when the result
    is differentiated again (create_graph, torch.func) autograd keeps every block's d, w, p:
    O(N S D) in all."""
    D = y.shape[1]
    inv = 1.0 / (s * s) if kind == 0 else 1.0 / s
    gys, gx, tsum = [], None, None
    for rows, d, w, p in _diff_blocks(y, x, s, kind):
        u = (g[rows, None] * p)[..., None] * w  # t_ns f'(d_nsj)
        if ny:
            gys.append(-u.sum(1))
        if nx:
            gx = u.sum(0) if gx is None else gx + u.sum(0)
        if ns:
            ts = (u * d).sum((0, 1))
            tsum = ts if tsum is None else tsum + ts
    gy = torch.cat(gys) * inv if ny else None
    gx = gx * inv if nx else None
    gs = _sigma_grad(g.sum(), tsum, s, D, kind) if ns else None
    return gy, gx, gs


def _jvp_torch(y, x, s, kind, dy, dx, ds):
    """Tangent of out [N] for tangents (dy, dx, ds) (None: zero), in differentiable torch ops:
    dout_n = sum_s p_ns (sum_j c_j w_nsj (dx_sj - dy_nj)) + sum_j (-1/s_j + c'_j E_p[f(d_nj)]) ds_j
    with c = 1/s^2, c' = 1/s^3 (Gaussian) or c = 1/s, c' = 1/s^2 (Laplace)."""
    D = y.shape[1]
    inv = 1.0 / (s * s) if kind == 0 else 1.0 / s
    outs = []
    for rows, d, w, p in _diff_blocks(y, x, s, kind):
        acc = None
        if dy is not None or dx is not None:
            # sum_j c_j w_nsj (dx_sj - dy_nj): [nb, S]
            t = 0
            if dx is not None:
                t = t + (w * (inv * dx)[None]).sum(-1)
            if dy is not None:
                t = t - (w * (inv * dy[rows])[:, None, :]).sum(-1)
            acc = (p * t).sum(1)
        if ds is not None:
            f = d * d if kind == 0 else d.abs()
            ef = (p[..., None] * f).sum(1)  # [nb, D]
            c2 = inv / s
            if s.numel() == 1:
                term = (-D / s + ef.sum(-1, keepdim=True) * c2) * ds  # [nb, 1]
            else:
                term = (-1.0 / s + ef * c2) * ds  # [nb, D]
            acc = term.sum(-1) if acc is None else acc + term.sum(-1)
        outs.append(acc)
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------
# the op: fastgen::spread_log_likelihood (impl, fake, autograd with jvp, vmap rule) and the
# internal fastgen::_spread_log_likelihood_backward (the fused backward of the fast path)
# ---------------------------------------------------------------------------------------------
def _sll_impl(y, samples, sigma, kind):
    """y [N, D], samples [S, D], sigma [1] or [D], one float dtype -> [N]. A tensor sigma is
    value-checked here on CPU (no sync there); on GPU a sigma <= 0 gives NaN."""
    if y.dim() != 2 or samples.dim() != 2 or samples.shape[1] != y.shape[1]:
        raise ValueError(f"spread_log_likelihood: y [N, D] and samples [S, D] expected, got shapes "
                         f"{tuple(y.shape)} and {tuple(samples.shape)}")
    if sigma.dim() != 1 or sigma.shape[0] not in (1, y.shape[1]):
        raise ValueError(f"spread_log_likelihood: sigma must have shape [1] or [D] = [{y.shape[1]}], "
                         f"got {tuple(sigma.shape)}")
    if y.device.type == "cpu":
        _check_sigma_values(sigma)
    N, D = y.shape
    return _dispatch.run("spread_log_likelihood",
                         ("forward", y.contiguous(), samples.contiguous(), sigma.contiguous(), kind),
                         device_type=y.device.type, N=N, S=samples.shape[0], D=D)


def _sll_fake(y, samples, sigma, kind):
    return y.new_empty(y.shape[:1])


@_compile.op("_spread_log_likelihood_backward",
             "(Tensor g, Tensor y, Tensor samples, Tensor sigma, Tensor out, int kind, bool ny, bool nx, "
             "bool ns) -> (Tensor, Tensor, Tensor)")
def _backward_op(g: torch.Tensor, y: torch.Tensor, samples: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor,
                 kind: int, ny: bool, nx: bool, ns: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_y, grad_samples, grad_sigma) by the fused backward of the selected backend; 0-element
    tensors where not requested. Not differentiable: used when fastgen._compile.fast_backward()."""
    N, D = y.shape
    gy, gx, gs = _dispatch.run("spread_log_likelihood",
                               ("backward", g.contiguous(), y.contiguous(), samples.contiguous(), sigma.contiguous(),
                                out, kind, ny, nx, ns),
                               device_type=y.device.type, N=N, S=samples.shape[0], D=D)
    # contiguous: the fake kernel cannot know a backend's layout (triton's grad_y is a transpose)
    return tuple(t.contiguous() if need else _compile.fresh_empty(like)
                 for t, need, like in ((gy, ny, y), (gx, nx, samples), (gs, ns, sigma)))


@_backward_op.register_fake
def _(g, y, samples, sigma, out, kind, ny, nx, ns):
    return tuple(like.new_empty(like.shape if need else (0,)) for need, like in ((ny, y), (nx, samples), (ns, sigma)))


class _SpreadLogLikelihood(_compile.OpFunction):
    @staticmethod
    def setup_context(ctx, inputs, output):
        y, samples, sigma, kind = inputs
        ctx.kind = kind
        ctx.save_for_backward(y, samples, sigma, output)
        ctx.save_for_forward(y, samples, sigma)

    @staticmethod
    def backward(ctx, g):
        y, samples, sigma, out = ctx.saved_tensors
        ny, nx, ns = ctx.needs_input_grad[:3]
        if _compile.fast_backward(g):  # fused, flash-style: recomputes the pairwise tiles
            gy, gx, gs = _backward_op(g, y, samples, sigma, out, ctx.kind, ny, nx, ns)
        else:  # differentiable: double backward, forward-over-reverse, vmap over the backward
            gy, gx, gs = _vjp_torch(g.to(y.dtype), y, samples, sigma, ctx.kind, ny, nx, ns)
        return (gy if ny else None), (gx if nx else None), (gs if ns else None), None

    @staticmethod
    def jvp(ctx, dy, dx, ds, _):
        y, samples, sigma = ctx.saved_tensors
        if dy is None and dx is None and ds is None:
            return torch.zeros(y.shape[:1], dtype=y.dtype, device=y.device)
        return _jvp_torch(y, samples, sigma, ctx.kind, dy, dx, ds)


def _vmap_rule(info, in_dims, y, samples, sigma, kind):
    """torch.func.vmap over spread_log_likelihood. Only y batched (the common case: per-example
    data, shared samples and sigma): the batch folds into N, one launch. Otherwise (samples or
    sigma batched): one launch per batch element (a Python loop over the batch)."""
    yd, xd, sd = in_dims[:3]
    B = info.batch_size
    if xd is None and sd is None:
        yb = y.movedim(yd, 0)
        out = _sll_op(yb.reshape(-1, yb.shape[-1]), samples, sigma, kind)
        return out.reshape(B, yb.shape[1]), 0
    yb = _compile.move_bdim(y, yd, B)
    xb = _compile.move_bdim(samples, xd, B)
    sb = _compile.move_bdim(sigma, sd, B)
    return torch.stack([_sll_op(yb[b], xb[b], sb[b], kind) for b in range(B)]), 0


_sll_op = _compile.define("spread_log_likelihood",
                                           "(Tensor y, Tensor samples, Tensor sigma, int kind) -> Tensor",
                                           _sll_impl, fake=_sll_fake, autograd=_SpreadLogLikelihood,
                                           vmap=_vmap_rule)

def spread_log_likelihood(y: torch.Tensor, samples: torch.Tensor, sigma, *, kind: str = "gaussian") -> torch.Tensor:
    """Monte-Carlo log-density of the spread model at y, fused:
    ``out[n] = log (1/S sum_s K_sigma(y_n - samples_s))``.

    Args:
        y: [N, D] points (spread data, ``data + noise``).
        samples: [S, D] model samples g(z_s).
        sigma: spread scale: std of the Gaussian kernel, scale b of the Laplace kernel. A float,
            a one-element tensor, or a [D] tensor (per-dimension scale); > 0.
        kind: ``"gaussian"`` (K = N(0, diag(sigma^2))) or ``"laplace"`` (K = prod_j
            exp(-|d_j| / b_j) / (2 b_j)).

    Returns:
        [N] log-likelihoods in nats: float32 (float64 when an input is float64; float16 /
        bfloat16 inputs are computed and returned in float32). Differentiable w.r.t. y, samples and
        a tensor sigma. Exact: direct differences, float32 accumulation (float64 for float64), so
        the error is float rounding of the log-density itself, also for data far from the origin.
        A point so far from every sample that all kernel values underflow float gets -inf.

    Memory O((N + S) D): online logsumexp over sample tiles (cpu, triton); the torch backend
    holds [N_chunk, S]. Backend: ``"cpu"`` on CPU when fastgen._C is built, ``"triton"`` on
    CUDA, else ``"torch"``.

    PyTorch integration: eager and compiled calls are the one custom op
    ``torch.ops.fastgen.spread_log_likelihood`` (fake kernel, backend chosen when it runs;
    ``torch.compile(fullgraph=True)`` works). Autograd: the fused backward kernel of the backend
    when the backward need not be differentiable; under ``create_graph=True`` or torch.func a
    differentiable plain-torch backward (direct differences in blocks of rows, O(N_block S D)
    temporaries; differentiating it again keeps O(N S D)): double backward and hessian w.r.t. y,
    samples and sigma. Forward-mode AD (``torch.func.jvp``, jacfwd) by the same blockwise
    formula. ``torch.func.vmap``: a batch of y alone folds into N (one launch); batched samples or
    sigma run one launch per batch element. Per-sample gradients: ``vmap(grad(f))``.
    A tensor sigma is value-checked inside the op on CPU (no sync); on GPU it is checked in eager
    calls outside torch.func (a host read), and not under torch.compile / torch.func (no host
    sync), where sigma <= 0 gives NaN. Autocast does not recast: float16 / bfloat16 inputs are
    computed in float32. Deterministic: fixed-order reductions on every backend (no float
    atomics).

    Raises:
        TypeError: non-tensor or non-float y / samples / sigma.
        ValueError: y or samples not 2-D or empty, D mismatch, different devices, sigma <= 0 /
            NaN / inf or of a wrong shape, unknown kind (``"uniform"`` is not a valid spread).
    """
    check_tensor("y", y, ndims=(2,))
    check_tensor("samples", samples, ndims=(2,))
    check_same_device(y=y, samples=samples)
    kind = check_kind(kind)
    N, D = y.shape
    if samples.shape[1] != D:
        raise ValueError(f"samples must have D = {D} columns like y, got shape {tuple(samples.shape)}")
    dtype = torch.float64 if torch.float64 in (y.dtype, samples.dtype) else torch.float32
    # a tensor sigma is value-checked inside the op on CPU; on GPU here (a host read), except
    # under torch.compile / torch.func
    check = y.device.type != "cpu" and not _compile.is_compiling() and not torch._C._are_functorch_transforms_active()
    s = _check_sigma(sigma, D, y.device, dtype, check_values=check)
    return _sll_op(y.to(dtype), samples.to(dtype), s, _KIND_ID[kind])
