"""spread_noise: ``y = x + sigma * eps`` with counter-based noise that is never stored.

Spread divergence (Zhang, Gao, Agakov & Barber 2019, arXiv 1811.08968, seed 001) convolves data
and model with a noise kernel K whose Fourier transform is strictly positive: Gaussian or Laplace.
This op draws that noise in one pass over memory; the backward regenerates it from (seed, offset)
to form ``grad_sigma = sum(eps * grad_y)`` over the broadcast dimensions of sigma.

Backends (``fastgen._dispatch``, op ``"spread_noise"``):

* ``"cpu"``: C++ / OpenMP kernel (csrc/cpu/spread_noise.cpp), Philox-4x32-10, vectorised
  Box-Muller, int64 offsets.
* ``"triton"``: the same Philox stream (``tl.philox``) and the same Box-Muller / Laplace maps as
  the C++ kernel, int64 offsets; runs on CUDA, and on CPU under ``TRITON_INTERPRET=1``.
* ``"torch"``: plain torch, drawing ``eps`` from a ``torch.Generator`` seeded per call from the
  same (seed, offset); backward regenerates it from that seed.

Each backend is deterministic for a given generator state. The cpu and triton backends share the
uint32 Philox stream and agree to float rounding (a few ulp of the log / sin / cos polynomials);
the torch backend draws different (equally distributed) noise.

Noise layout of the cpu and triton backends (flat, row-major index i of x):
``counter = offset + 64 * (i // 256) + i % 64``, Philox output word ``(i % 256) // 64``. Gaussian:
Box-Muller on words (0, 1) and (2, 3) with ``u1 = (w0 + 1/2) 2^-32`` so that the largest
|eps| is sqrt(66 ln 2) = 6.76 (``tl.randn`` clamps u1 at 1e-7, i.e. |eps| <= 5.68). Laplace of
scale b = 1 (density exp(-|e|)/2, variance 2): sign from the top bit, |eps| = -log((m + 1/2) 2^-31)
from the low 31 bits m.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
from torch._subclasses.fake_tensor import is_fake

from .. import _backend, _compile, _dispatch
from .._dispatch import register
from .._validate import FLOAT_DTYPES, check_kind, check_sigma_values, check_tensor

try:  # Triton is optional: fastgen imports without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["spread_noise"]

_KIND_ID = {"gaussian": 0, "laplace": 1}
_CHUNK = 256          # elements per 64 Philox counters (4 words each)
_SEED_MASK = (1 << 63) - 1


# ---------------------------------------------------------------------------------------------
# seeds
# ---------------------------------------------------------------------------------------------
def _counters_used(numel: int) -> int:
    n = (numel + _CHUNK - 1) // _CHUNK * 64
    return (n + 3) // 4 * 4


def _draw_seed(generator, numel: int) -> tuple[torch.Tensor, int]:
    """(seed, offset) for one call: seed a CPU int64 0-d tensor (masked to 63 bits where it is
    used, :func:`_seed_of`), offset an int. Never synchronises with a GPU.

    * ``generator=None``: one 64-bit integer from the default CPU generator (``torch.manual_seed``
      seeds it), also for CUDA tensors: drawing on the CPU costs a few microseconds and needs
      no device-to-host copy. offset = 0.
    * a CPU ``torch.Generator``: the same, from it.
    * a CUDA ``torch.Generator``: seed = its initial seed, offset = its Philox offset, which is
      then advanced past the ``numel`` elements' counters (the way torch's own CUDA kernels
      consume it).

    The draw bypasses torch.func and the legacy vmap of gradcheck (every dispatch mode key: see
    :func:`_plain_dispatch`): under vmap the op's vmap rule applies the ``randomness`` mode to
    the whole call, not torch's rule for this one-integer draw.
    """
    if generator is None:
        generator = torch.default_generator
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type == "cuda" and hasattr(generator, "get_offset"):
        offset = generator.get_offset()
        generator.set_offset(offset + _counters_used(numel))
        return torch.tensor(generator.initial_seed() & _SEED_MASK, dtype=torch.int64), offset
    with _plain_dispatch():
        if generator.device.type == "cpu":
            return torch.empty((), dtype=torch.int64).random_(generator=generator), 0
        # other generator devices: draw on that device (may synchronise)
        return torch.randint(0, 2**62, (), generator=generator, device=generator.device).cpu(), 0


_DK = torch._C.DispatchKey
_PLAIN_KEYS = torch._C.DispatchKeySet(_DK.BackendSelect) | torch._C.DispatchKeySet(_DK.ADInplaceOrView)


def _plain_dispatch():
    """A context without the thread's mode dispatch keys (functorch's dynamic layers, the legacy
    vmap mode that gradcheck's batched forward-AD check uses): ops inside run as plain ops."""
    extra = torch._C._dispatch_tls_local_include_set() - _PLAIN_KEYS
    if extra.raw_repr() == 0:
        return contextlib.nullcontext()
    return torch._C._ExcludeDispatchKeyGuard(extra)


def _physical_numel(x: torch.Tensor, sigma) -> int:
    """Elements of the noise one call draws, also under vmap (where x.numel() is one example's):
    an upper bound from the unwrapped (physical) x and sigma, for the CUDA generator's offset."""
    f = torch._C._functorch

    def unwrap(t):
        while f.is_functorch_wrapped_tensor(t):
            t = f.get_unwrapped(t)
        return t

    n = unwrap(x).numel()
    if isinstance(sigma, torch.Tensor) and sigma.numel() > 0:
        n *= max(1, unwrap(sigma).numel() // sigma.numel())
    return n


# ---------------------------------------------------------------------------------------------
# broadcasting of sigma, by index arithmetic
# ---------------------------------------------------------------------------------------------
def _groups(shape, strides) -> list[tuple[int, int, int]]:
    """Collapse a broadcast view (``shape`` of x, ``strides`` of sigma expanded to it, 0 on
    broadcast dims) into groups (inner, size, stride) with non-zero stride, so that the sigma
    offset of flat index i is ``sum((i // inner) % size * stride)``."""
    dims: list[list[int]] = []
    for n, st in zip(shape, strides):
        if n == 1:
            continue
        if dims and dims[-1][1] == st * n:
            dims[-1][0] *= n
            dims[-1][1] = st
        else:
            dims.append([n, st])
    out = []
    inner = 1
    for n, st in reversed(dims):
        if st != 0:
            out.append((inner, n, st))
        inner *= n
    return out[::-1]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _call(impl, method: str, *args):
    """A backend as registered with fastgen._dispatch: ``fn("forward" | "grad_sigma", *args)``."""
    return getattr(impl, method)(*args)


# ---------------------------------------------------------------------------------------------
# torch backend
# ---------------------------------------------------------------------------------------------
class _TorchImpl:
    """eps from a torch.Generator seeded per call; regenerated in backward."""

    @staticmethod
    def noise(shape, kind, seed, offset, dtype, device):
        # drawn in float32 whatever x's dtype (the same noise for every dtype, like cpu / triton)
        # (a private generator: drawn as plain ops also under vmap modes, see _plain_dispatch)
        g = torch.Generator(device=device)
        g.manual_seed((seed ^ (offset * 0x9E3779B97F4A7C15)) & _SEED_MASK)
        with _plain_dispatch():
            if kind == 0:
                return torch.randn(shape, generator=g, dtype=torch.float32, device=device).to(dtype)
            mag = torch.empty(shape, dtype=torch.float32, device=device).exponential_(1.0, generator=g)
            sign = torch.randint(0, 2, shape, generator=g, device=device, dtype=torch.int8)
            return torch.where(sign.bool(), mag, -mag).to(dtype)

    @classmethod
    def forward(cls, x, sigma_t, sigma_f, kind, seed, offset):
        ct = _compute_dtype(x.dtype)
        eps = cls.noise(x.shape, kind, seed, offset, ct, x.device)
        s = sigma_t.to(ct) if sigma_t is not None else sigma_f
        return (x.to(ct) + s * eps).to(x.dtype)

    @classmethod
    def grad_sigma(cls, grad_y, sigma_t, kind, seed, offset):
        ct = _compute_dtype(grad_y.dtype)
        eps = cls.noise(grad_y.shape, kind, seed, offset, ct, grad_y.device)
        acc = torch.float64 if grad_y.device.type == "cpu" else ct
        return (eps.to(acc) * grad_y.to(acc)).sum_to_size(sigma_t.shape)


register("spread_noise", "torch")(functools.partial(_call, _TorchImpl))


# ---------------------------------------------------------------------------------------------
# cpu backend (fastgen._C)
# ---------------------------------------------------------------------------------------------
@_backend.fake("_spread_noise_kernel")
def _(x, sigma, kind, seed, offset):  # csrc/cpu/spread_noise.cpp: y contiguous, x's shape and dtype
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_backend.fake("_spread_noise_grad_sigma_kernel")
def _(grad_y, sigma, kind, seed, offset):  # grad_sigma in sigma's shape, float64
    return grad_y.new_empty(sigma.shape, dtype=torch.float64)


class _CppImpl:
    @staticmethod
    def forward(x, sigma_t, sigma_f, kind, seed, offset):
        if sigma_t is None:
            sigma_t = torch.tensor(sigma_f, dtype=_compute_dtype(x.dtype))
        return _backend.ext_op("_spread_noise_kernel")(x, sigma_t, kind, seed, offset)

    @staticmethod
    def grad_sigma(grad_y, sigma_t, kind, seed, offset):
        return _backend.ext_op("_spread_noise_grad_sigma_kernel")(grad_y, sigma_t.detach(), kind, seed, offset)


register("spread_noise", "cpu")(functools.partial(_call, _CppImpl))


# ---------------------------------------------------------------------------------------------
# triton backend
# ---------------------------------------------------------------------------------------------
_MAX_GROUPS = 4

if HAS_TRITON:

    @triton.jit
    def _sincos2pi(b):
        # sin, cos of 2 pi b 2^-32 for uint32 b: exact integer quadrant reduction, then Cephes
        # polynomials on [-pi/4, pi/4] (the same float operations as csrc/cpu/spread_noise.cpp).
        q = (b + 536870912) >> 30
        rr = (b - (q << 30)).to(tl.int32, bitcast=True)
        x = rr.to(tl.float32) * 1.4629180792671596e-09
        z = x * x
        sp = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * x + x
        cp = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z \
            - 0.5 * z + 1.0
        swap = (q & 1) != 0
        sv = tl.where(swap, cp, sp)
        cv = tl.where(swap, sp, cp)
        s = tl.where((q & 2) != 0, -sv, sv)
        c = tl.where(((q + 1) & 2) != 0, -cv, cv)
        return s, c

    @triton.jit
    def _radius(a):
        # Box-Muller radius from uint32 a: u1 = (a + 1/2) 2^-32 in (0, 1]
        u1 = a.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10
        return tl.sqrt(-2.0 * tl.log(u1))

    @triton.jit
    def _laplace(w):
        v = (w & 0x7FFFFFFF).to(tl.float32) * 4.656612873077393e-10 + 2.3283064365386963e-10
        m = -tl.log(v)
        return tl.where((w >> 31) != 0, -m, m)

    @triton.jit
    def _words(seed, offset, chunk, g):
        # Philox-4x32-10 outputs for the counters offset + 64 * chunk + g (int64)
        ctr = offset + chunk * 64 + g
        c0 = (ctr & 0xFFFFFFFF).to(tl.uint32)
        c1 = ((ctr >> 32) & 0xFFFFFFFF).to(tl.uint32)
        z = c0 * 0
        return tl.philox(seed, c0, c1, z, z)

    @triton.jit
    def _chunk_noise(seed, offset, chunk, g, KIND: tl.constexpr):
        o0, o1, o2, o3 = _words(seed, offset, chunk, g)
        if KIND == 0:
            ra = _radius(o0)
            sa, ca = _sincos2pi(o1)
            rb = _radius(o2)
            sb, cb = _sincos2pi(o3)
            e0 = ra * ca
            e1 = ra * sa
            e2 = rb * cb
            e3 = rb * sb
        else:
            e0 = _laplace(o0)
            e1 = _laplace(o1)
            e2 = _laplace(o2)
            e3 = _laplace(o3)
        return e0, e1, e2, e3

    @triton.jit
    def _sigma_off(idx, in0, sz0, st0, in1, sz1, st1, in2, sz2, st2, in3, sz3, st3, NG: tl.constexpr):
        off = (idx // in0) % sz0 * st0
        if NG > 1:
            off += (idx // in1) % sz1 * st1
        if NG > 2:
            off += (idx // in2) % sz2 * st2
        if NG > 3:
            off += (idx // in3) % sz3 * st3
        return off

    @triton.jit
    def _lane_store(x_ptr, y_ptr, sigma_ptr, sigma_f, e, idx, numel,
                    in0, sz0, st0, in1, sz1, st1, in2, sz2, st2, in3, sz3, st3,
                    NG: tl.constexpr, MODE: tl.constexpr, F64: tl.constexpr):
        mask = idx < numel
        xv = tl.load(x_ptr + idx, mask=mask, other=0.0)
        if MODE == 1:  # prod = eps * grad_y (backward, general broadcast)
            tl.store(y_ptr + idx, e * xv.to(tl.float32), mask=mask)
        else:
            if NG == 0:
                s = sigma_f
            else:
                soff = _sigma_off(idx, in0, sz0, st0, in1, sz1, st1, in2, sz2, st2, in3, sz3, st3, NG)
                s = tl.load(sigma_ptr + soff, mask=mask, other=0.0)
            if F64:
                yv = xv.to(tl.float64) + s.to(tl.float64) * e.to(tl.float64)
            else:
                yv = xv.to(tl.float32) + s.to(tl.float32) * e
            tl.store(y_ptr + idx, yv.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _noise_kernel(x_ptr, y_ptr, sigma_ptr, sigma_f, numel, seed, offset,
                      in0, sz0, st0, in1, sz1, st1, in2, sz2, st2, in3, sz3, st3,
                      KIND: tl.constexpr, NG: tl.constexpr, MODE: tl.constexpr, F64: tl.constexpr,
                      CH: tl.constexpr):
        # One program: CH chunks of 256 elements = CH x 64 Philox counters.
        # MODE 0: y = x + sigma * eps.  MODE 1: y = eps * x (x holds grad_y), fp32 out.
        pid = tl.program_id(0).to(tl.int64)
        chunk = pid * CH + tl.arange(0, CH).to(tl.int64)[:, None]
        g = tl.arange(0, 64).to(tl.int64)[None, :]
        e0, e1, e2, e3 = _chunk_noise(seed, offset, chunk, g, KIND)
        base = chunk * 256 + g
        _lane_store(x_ptr, y_ptr, sigma_ptr, sigma_f, e0, base, numel,
                    in0, sz0, st0, in1, sz1, st1, in2, sz2, st2, in3, sz3, st3, NG, MODE, F64)
        _lane_store(x_ptr, y_ptr, sigma_ptr, sigma_f, e1, base + 64, numel,
                    in0, sz0, st0, in1, sz1, st1, in2, sz2, st2, in3, sz3, st3, NG, MODE, F64)
        _lane_store(x_ptr, y_ptr, sigma_ptr, sigma_f, e2, base + 128, numel,
                    in0, sz0, st0, in1, sz1, st1, in2, sz2, st2, in3, sz3, st3, NG, MODE, F64)
        _lane_store(x_ptr, y_ptr, sigma_ptr, sigma_f, e3, base + 192, numel,
                    in0, sz0, st0, in1, sz1, st1, in2, sz2, st2, in3, sz3, st3, NG, MODE, F64)

    @triton.jit
    def _grad_scalar_kernel(g_ptr, part_ptr, numel, seed, offset, KIND: tl.constexpr, CH: tl.constexpr):
        # sigma with one element: per-program partial sums of eps * grad_y (deterministic)
        pid = tl.program_id(0).to(tl.int64)
        chunk = pid * CH + tl.arange(0, CH).to(tl.int64)[:, None]
        g = tl.arange(0, 64).to(tl.int64)[None, :]
        e0, e1, e2, e3 = _chunk_noise(seed, offset, chunk, g, KIND)
        base = chunk * 256 + g
        acc = tl.sum(tl.sum(e0 * tl.load(g_ptr + base, mask=base < numel, other=0.0).to(tl.float32), 1), 0)
        i1 = base + 64
        acc += tl.sum(tl.sum(e1 * tl.load(g_ptr + i1, mask=i1 < numel, other=0.0).to(tl.float32), 1), 0)
        i2 = base + 128
        acc += tl.sum(tl.sum(e2 * tl.load(g_ptr + i2, mask=i2 < numel, other=0.0).to(tl.float32), 1), 0)
        i3 = base + 192
        acc += tl.sum(tl.sum(e3 * tl.load(g_ptr + i3, mask=i3 < numel, other=0.0).to(tl.float32), 1), 0)
        tl.store(part_ptr + pid, acc)

    @triton.jit
    def _grad_group_kernel(g_ptr, part_ptr, R, P, I, seed, offset, n_rprog,
                           KIND: tl.constexpr, BR: tl.constexpr, BP: tl.constexpr):
        # One broadcast group: x viewed as [A, P, I], sigma index p, reduction over r in
        # [0, A * I). Element index i = (r // I) * P * I + p * I + r % I; the noise of each
        # element is regenerated from its own Philox counter (word (i % 256) // 64).
        pid_r = tl.program_id(0)
        pid_p = tl.program_id(1)
        p = pid_p * BP + tl.arange(0, BP).to(tl.int64)
        pmask = p < P
        acc = tl.zeros([BP], dtype=tl.float32)
        for r0 in range(pid_r * BR, R, n_rprog * BR):
            r = r0 + tl.arange(0, BR).to(tl.int64)
            i = (r // I)[:, None] * (P * I) + p[None, :] * I + (r % I)[:, None]
            m = (r < R)[:, None] & pmask[None, :]
            w = i % 256
            lane = w // 64
            o0, o1, o2, o3 = _words(seed, offset, i // 256, w % 64)
            if KIND == 0:
                a = tl.where(lane < 2, o0, o2)
                b = tl.where(lane < 2, o1, o3)
                rad = _radius(a)
                s, c = _sincos2pi(b)
                e = rad * tl.where((lane % 2) == 0, c, s)
            else:
                wd = tl.where(lane == 0, o0, tl.where(lane == 1, o1, tl.where(lane == 2, o2, o3)))
                e = _laplace(wd)
            gv = tl.load(g_ptr + i, mask=m, other=0.0).to(tl.float32)
            acc += tl.sum(e * gv, 0)
        tl.store(part_ptr + pid_r.to(tl.int64) * P + p, acc, mask=pmask)


def _interp() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _group_args(groups):
    flat = []
    for k in range(_MAX_GROUPS):
        flat += list(groups[k]) if k < len(groups) else [1, 1, 0]
    return flat


class _TritonImpl:
    @staticmethod
    def _ch(numel):
        # chunks (of 256 elements) per program: 4 on GPU (1024 elements), fewer programs in the
        # interpreter. The noise layout does not depend on it.
        return 4 if not _interp() else 8

    @classmethod
    def forward(cls, x, sigma_t, sigma_f, kind, seed, offset):
        numel = x.numel()
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        if numel == 0:
            return y
        ct = _compute_dtype(x.dtype)
        if sigma_t is None:  # a float: a kernel argument
            groups, sptr, sf = [], x, float(sigma_f)
        else:
            s = sigma_t.detach()
            s = s if s.dtype == ct else s.to(ct)
            if s.numel() == 1:  # read through a group of size 1: offset 0
                groups, sptr = [(1, 1, 0)], s.reshape(1)
            else:
                groups = _groups(x.shape, s.expand(x.shape).stride())
                if len(groups) > _MAX_GROUPS:  # > 4 alternating broadcast groups: materialise
                    s = s.expand(x.shape).contiguous()
                    groups = _groups(x.shape, s.stride())
                sptr = s
            sf = 0.0
        ng = len(groups)
        CH = cls._ch(numel)
        grid = (triton.cdiv(numel, _CHUNK * CH),)
        _noise_kernel[grid](x, y, sptr, sf, numel, seed, offset, *_group_args(groups),
                            KIND=kind, NG=ng, MODE=0, F64=(ct == torch.float64), CH=CH)
        return y

    @classmethod
    def grad_sigma(cls, grad_y, sigma_t, kind, seed, offset):
        numel = grad_y.numel()
        out = torch.zeros(sigma_t.shape, dtype=torch.float32, device=grad_y.device)
        if numel == 0:
            return out
        CH = cls._ch(numel)
        if sigma_t.numel() == 1:
            nprog = triton.cdiv(numel, _CHUNK * CH)
            part = torch.empty(nprog, dtype=torch.float32, device=grad_y.device)
            _grad_scalar_kernel[(nprog,)](grad_y, part, numel, seed, offset, KIND=kind, CH=CH)
            return part.double().sum().reshape(sigma_t.shape)
        groups = _groups(grad_y.shape, out.expand(grad_y.shape).stride())
        if len(groups) == 1:
            inner, P, st = groups[0]
            assert st == 1
            A = numel // (inner * P)
            R = A * inner
            BP = min(triton.next_power_of_2(P), 64)
            BR = max(16, 1024 // BP) if not _interp() else max(16, 256 // BP)
            n_pprog = triton.cdiv(P, BP)
            target = 4 * 132 if grad_y.is_cuda else 4
            n_rprog = max(1, min(triton.cdiv(R, BR), max(1, target // n_pprog)))
            part = torch.empty((n_rprog, P), dtype=torch.float32, device=grad_y.device)
            _grad_group_kernel[(n_rprog, n_pprog)](grad_y, part, R, P, inner, seed, offset, n_rprog,
                                                   KIND=kind, BR=BR, BP=BP)
            return part.double().sum(0).reshape(sigma_t.shape)
        # several broadcast groups: eps * grad_y in one pass, then torch's reduction
        prod = torch.empty(grad_y.shape, dtype=torch.float32, device=grad_y.device)
        grid = (triton.cdiv(numel, _CHUNK * CH),)
        _noise_kernel[grid](grad_y, prod, grad_y, 0.0, numel, seed, offset, *_group_args([]),
                            KIND=kind, NG=0, MODE=1, F64=False, CH=CH)
        return prod.double().sum_to_size(sigma_t.shape)


register("spread_noise", "triton")(functools.partial(_call, _TritonImpl))


# ---------------------------------------------------------------------------------------------
# argument checks of the public function
# ---------------------------------------------------------------------------------------------
def _check_sigma(sigma, x: torch.Tensor, check_values: bool = True):
    """Returns (sigma_t, sigma_f): a tensor view of sigma with x.dim() dims, or a float.
    check_values=False skips the value check of a tensor sigma (a host read on CUDA)."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, torch.Tensor)):
        raise TypeError(f"sigma must be a float or a floating-point tensor, got {type(sigma).__name__}")
    if not isinstance(sigma, torch.Tensor):
        s = float(sigma)
        if not (0 <= s < math.inf):  # (no math.isinf: dynamo with dynamic=True)
            raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
        return None, s
    if sigma.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sigma must be a floating-point tensor, got {sigma.dtype}")
    if sigma.device != x.device:
        if sigma.dim() == 0 and sigma.device.type == "cpu":
            sigma = sigma.to(x.device)  # a CPU scalar tensor, like torch's own ops accept
        else:
            raise ValueError(f"sigma is on {sigma.device} but x is on {x.device}: all inputs must be on one device")
    if sigma.dim() > x.dim() or any(a != 1 and a != b for a, b in zip(reversed(sigma.shape), reversed(x.shape))):
        raise ValueError(f"sigma of shape {tuple(sigma.shape)} must be broadcastable to x of shape "
                         f"{tuple(x.shape)} (without enlarging x)")
    if check_values:
        _check_sigma_values(sigma)
    view = sigma.reshape((1,) * (x.dim() - sigma.dim()) + tuple(sigma.shape)) if sigma.dim() < x.dim() else sigma
    return view, None


def _check_sigma_values(sigma: torch.Tensor) -> None:
    check_sigma_values(sigma, allow_zero=True)


def _seed_of(seed: torch.Tensor) -> int:
    return int(seed) & _SEED_MASK  # a CPU int64 scalar: reading it is free


def _sigma_view(sigma, ndim: int):
    """sigma (None, or a tensor broadcastable to x) with x's number of dims."""
    if sigma is None or sigma.dim() == ndim:
        return sigma
    return sigma.reshape((1,) * (ndim - sigma.dim()) + tuple(sigma.shape))


# ---------------------------------------------------------------------------------------------
# the op: fastgen::spread_noise (impl, fake, autograd with jvp, vmap rule) and the internal
# fastgen::_spread_noise_grad_sigma (the fused, non-differentiable grad_sigma of the fast backward)
# ---------------------------------------------------------------------------------------------
_SCHEMA = ("(Tensor x, Tensor? sigma, float sigma_f, int kind, Tensor seed, int offset=0, "
           "str backend=\"auto\") -> Tensor")


def _noise_impl(x, sigma, sigma_f, kind, seed, offset=0, backend="auto"):
    """y = x + sigma * eps (sigma_f when sigma is None), eps drawn from (seed, offset) by the
    backend fastgen._dispatch selects (``backend`` names one). A tensor sigma is value-checked
    here on CPU (no sync there)."""
    sigma_t = _sigma_view(sigma, x.dim())
    if sigma_t is not None and x.device.type == "cpu":
        _check_sigma_values(sigma_t)
    y = _dispatch.run("spread_noise", ("forward", x.contiguous(), sigma_t, sigma_f, kind, _seed_of(seed), offset),
                      backend=backend, device_type=x.device.type)
    return y.clone() if y is x else y


def _noise_fake(x, sigma, sigma_f, kind, seed, offset=0, backend="auto"):
    return x.new_empty(x.shape)


@_compile.op("_spread_noise_grad_sigma",
             "(Tensor grad_y, Tensor sigma, int kind, Tensor seed, int offset, str backend) -> Tensor")
def _grad_sigma_op(grad_y: torch.Tensor, sigma: torch.Tensor, kind: int, seed: torch.Tensor, offset: int,
                   backend: str) -> torch.Tensor:
    """sum(eps * grad_y) over the broadcast dims of sigma (sigma's shape and dtype), the noise
    regenerated from (seed, offset) by ``backend`` (the one that drew it in the forward pass)."""
    sigma_t = _sigma_view(sigma, grad_y.dim())
    g = _dispatch.run("spread_noise", ("grad_sigma", grad_y.contiguous(), sigma_t.detach(), kind, _seed_of(seed),
                                       offset), backend=backend, device_type=grad_y.device.type)
    return g.reshape(sigma.shape).to(sigma.dtype).clone()


@_grad_sigma_op.register_fake
def _(grad_y, sigma, kind, seed, offset, backend):
    return sigma.new_empty(sigma.shape)


def _resolved_backend(x: torch.Tensor, backend: str) -> str:
    """The backend that drew the noise (so that backward and jvp regenerate the same noise even
    outside the forward's ``use_backend`` block). While torch.compile traces (fake tensors) the
    choice is left to run time ("auto"), as in the forward op."""
    if backend != "auto":
        return backend
    if is_fake(x):
        return "auto"
    return _dispatch.select("spread_noise", "auto", x.device.type)[0]


def _regenerate(ctx, sigma, seed):
    """eps of the forward pass (compute dtype), recomputed by the op itself from (seed, offset)
    with x = 0 and sigma = 1: under vmap these zeros / ones carry the batch dims of x and sigma, so
    the vmap rule draws the noise exactly as it did in the forward pass. Differentiable callers
    get a constant (no input needs grad)."""
    ct = _compute_dtype(ctx.x_dtype)
    if ctx.probe is not None:  # x was (or may have been) batched: keep its batch dims
        z = torch.zeros_like(ctx.probe, dtype=ct).reshape((1,) * len(ctx.x_shape)).expand(ctx.x_shape)
    else:
        z = torch.zeros(ctx.x_shape, dtype=ct, device=ctx.x_device)
    one = torch.ones_like(sigma, dtype=ct)
    return _noise_op(z, one, 0.0, ctx.kind, seed, ctx.offset, ctx.backend)


class _SpreadNoise(_compile.OpFunction):
    @staticmethod
    def setup_context(ctx, inputs, output):
        x, sigma, sigma_f, kind, seed = inputs[:5]
        offset = inputs[5] if len(inputs) > 5 else 0
        backend = inputs[6] if len(inputs) > 6 else "auto"
        ctx.kind, ctx.offset = kind, offset
        ctx.backend = _resolved_backend(x, backend)
        ctx.x_shape, ctx.x_dtype, ctx.x_device = x.shape, x.dtype, x.device
        ctx.has_sigma = sigma is not None
        # under torch.func, a one-element slice of x remembers x's batch dims (see _regenerate);
        # x itself is not kept
        ctx.probe = None
        if sigma is not None and torch._C._are_functorch_transforms_active() and x.numel() > 0:
            ctx.probe = x.detach()[(0,) * x.dim()].clone()
        if sigma is not None:
            ctx.save_for_backward(sigma, seed)
            ctx.save_for_forward(sigma, seed)

    @staticmethod
    def backward(ctx, grad_y):
        gx = grad_y if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.has_sigma and ctx.needs_input_grad[1]:
            sigma, seed = ctx.saved_tensors
            if _compile.fast_backward(grad_y):  # one fused pass, the noise regenerated in registers
                gs = _grad_sigma_op(grad_y, sigma, ctx.kind, seed, ctx.offset, ctx.backend)
            else:  # differentiable (linear in grad_y): double backward, torch.func
                eps = _regenerate(ctx, sigma, seed)
                gs = (eps * grad_y.to(eps.dtype)).sum_to_size(sigma.shape).to(sigma.dtype)
        return gx, gs, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dx, dsigma, *_):
        # dy = dx + dsigma * eps
        out = dx
        if ctx.has_sigma and dsigma is not None:
            sigma, seed = ctx.saved_tensors
            eps = _regenerate(ctx, sigma, seed)
            t = (_sigma_view(dsigma, eps.dim()).to(eps.dtype) * eps).to(ctx.x_dtype)
            out = t if out is None else out + t
        if out is None:
            out = torch.zeros(ctx.x_shape, dtype=ctx.x_dtype, device=ctx.x_device)
        return out


_RANDOMNESS_ERROR = ("vmap: called random operation while in randomness error mode. Please either use the "
                     "'same' or 'different' randomness flags on vmap or perform the randomness operation out "
                     "of vmap")


def _vmap_rule(info, in_dims, x, sigma, sigma_f, kind, seed, offset=0, backend="auto"):
    """torch.func.vmap over spread_noise, following vmap's ``randomness``:

    * "error" (vmap's default): RuntimeError, the one torch raises for its own random ops.
    * "different": independent noise for every batch element: one launch on the batched tensor
      (element b gets the noise of flat indices [b * n, (b + 1) * n) of the call's stream).
    * "same": one draw of one element's noise (one launch), shared by the batch:
      y[b] = x[b] + sigma[b] * eps in torch ops.
    """
    xd, sd, seedd = in_dims[0], in_dims[1], in_dims[4]
    if seedd is not None:
        raise ValueError("spread_noise: the seed tensor cannot be batched under vmap")
    if info.randomness == "error":
        raise RuntimeError(_RANDOMNESS_ERROR)
    B = info.batch_size
    xb = x.movedim(xd, 0) if xd is not None else None
    ex_shape = xb.shape[1:] if xb is not None else x.shape  # one example's x
    sb = None
    if sd is not None:  # [B, *one example's sigma], aligned to one example's x dims
        sb = sigma.movedim(sd, 0)
        sb = sb.reshape((B,) + (1,) * (len(ex_shape) - (sb.dim() - 1)) + tuple(sb.shape[1:]))
    elif sigma is not None:
        sb = sigma
    if info.randomness == "different":
        if xb is None:
            xb = x.expand((B,) + tuple(x.shape))
        return _noise_op(xb, sb, sigma_f, kind, seed, offset, backend), 0
    # "same"
    if sb is not None and x.device.type == "cpu":
        _check_sigma_values(sb)
    ct = _compute_dtype(x.dtype)
    eps = _noise_op(torch.zeros(ex_shape, dtype=ct, device=x.device), None, 1.0, kind, seed, offset, backend)
    xv = xb if xb is not None else x
    s = sb.to(ct) if sb is not None else sigma_f
    return (xv.to(ct) + s * eps).to(x.dtype), 0


_noise_op = _compile.define("spread_noise", _SCHEMA, _noise_impl, fake=_noise_fake, autograd=_SpreadNoise,
                                  vmap=_vmap_rule)


# ---------------------------------------------------------------------------------------------
# public function
# ---------------------------------------------------------------------------------------------
def spread_noise(x: torch.Tensor, sigma, *, kind: str = "gaussian", generator=None) -> torch.Tensor:
    """Spread noise ``y = x + sigma * eps`` in one pass, with ``eps`` never stored.

    Args:
        x: tensor of any shape, float32 / float16 / bfloat16 / float64, CPU or CUDA. A
            non-contiguous x is made contiguous once.
        sigma: the spread scale (standard deviation for ``"gaussian"``, Laplace scale b for
            ``"laplace"``): a float >= 0, or a tensor >= 0 broadcastable to x (e.g. a learned
            per-dimension spread of shape [D] for x [N, D], or [C, 1, 1] for images), read in
            place through its broadcast strides, never expanded in memory (the triton backend
            indexes up to 4 alternating broadcast groups, and materialises sigma beyond that).
        kind: ``"gaussian"`` (eps ~ N(0, 1)) or ``"laplace"`` (eps ~ Laplace(0, 1), scale b = 1:
            density exp(-|e|)/2, variance 2). Both have strictly positive Fourier transforms, as
            the spread divergence requires (Zhang et al. 2019, seed 001); ``"uniform"`` does not
            and is rejected.
        generator: ``torch.Generator`` whose state seeds the noise; None uses the default CPU
            generator (``torch.manual_seed``), also for CUDA tensors (no host sync). A CUDA
            generator supplies (initial seed, Philox offset) and its offset is advanced.

    Returns:
        y with x's shape and dtype (arithmetic in float32, float64 for float64 x).
        Differentiable w.r.t. x (``grad_x = grad_y``) and a tensor sigma
        (``grad_sigma = sum(eps * grad_y)`` over sigma's broadcast dims, the noise regenerated
        from its seed in backward, accumulated in float64 on CPU).

    The same generator state gives the same y on the same backend (cpu and triton agree to a few
    ulp; torch draws different noise). Backend: ``"cpu"`` for CPU tensors when fastgen._C is
    built, ``"triton"`` on CUDA, else ``"torch"`` (override with ``fastgen._dispatch.use_backend``
    or FASTGEN_BACKEND); the backward uses the backend that drew the noise.

    PyTorch integration: eager and compiled calls are the one custom op
    ``torch.ops.fastgen.spread_noise`` (fake kernel; autograd with a fused grad_sigma pass, or a
    differentiable one under create_graph / torch.func: double backward, ``torch.func.jvp``,
    jacrev, jacfwd, hessian; a vmap rule). Under ``torch.func.vmap`` the op follows vmap's
    ``randomness``: "error" (the default) raises torch's RuntimeError for random ops;
    "different" draws independent noise for every batch element (one launch over the batch);
    "same" draws one example's noise and shares it across the batch. Per-sample gradients:
    ``vmap(grad(f), randomness=...)``. A jacfwd / hessian of a function that calls spread_noise
    with unbatched inputs sees one fixed draw (the op is only batched when an input is).
    Under ``torch.compile`` (fullgraph=True works) the seed is drawn inside the graph from the
    default generator (a fresh seed per call; ``generator`` must be None there). A tensor sigma
    is value-checked inside the op on CPU; on GPU it is checked in eager calls outside torch.func
    (a host read) and not under torch.compile / torch.func (no host sync). Autocast does not
    recast: y has x's dtype, computed in float32. Deterministic: the same seed gives bitwise the
    same noise (counter-based; no atomics).

    Raises:
        TypeError: x or sigma not a floating-point tensor / float; generator not a Generator;
            kind not a string.
        ValueError: sigma < 0, NaN or inf (for a tensor sigma: one reduction over sigma, a host
            read on CUDA); sigma not broadcastable to x; sigma on another device; kind not
            ``"gaussian"`` / ``"laplace"`` (``"uniform"`` is not a valid spread).
        RuntimeError: under ``torch.func.vmap(..., randomness="error")`` (vmap's default).
    """
    check_tensor("x", x, allow_empty=True)
    kind = check_kind(kind)
    compiling = _compile.is_compiling()
    # a tensor sigma is value-checked inside the op on CPU; on GPU here (a host read), except
    # under torch.compile / torch.func
    check = x.device.type != "cpu" and not compiling and not torch._C._are_functorch_transforms_active()
    sigma_t, sigma_f = _check_sigma(sigma, x, check_values=check)
    sf = 0.0 if sigma_f is None else sigma_f
    if compiling:  # the seed is drawn in the graph (a fresh one per call)
        if generator is not None:
            raise ValueError("spread_noise under torch.compile draws its seed from the default generator "
                             "(torch.manual_seed): pass generator=None")
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
        return _noise_op(x, sigma_t, sf, _KIND_ID[kind], seed)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    numel = _physical_numel(x, sigma_t) if generator is not None and generator.device.type == "cuda" else x.numel()
    seed, offset = _draw_seed(generator, numel)
    return _noise_op(x, sigma_t, sf, _KIND_ID[kind], seed, offset)
