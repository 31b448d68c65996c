"""fastgen.imle_loss: the IMLE objective (Li & Malik 2018, arXiv 1809.09087, eq. 1 / Alg. 1),
its conditional form (cIMLE, Li*, Zhang* & Malik 2020) and RS-IMLE (Vashist, Li et al. 2024).

The hot path is the nearest-neighbour search, done by :func:`fastgen.knn` (exact, batched,
any backend). The loss itself is then recomputed in plain torch from the picked indices:
||data_i - samples_{j*(i)}||^2 by direct differences, so the value is exact for the chosen
neighbour and its gradient flows into ``samples`` only (``data`` is a target).
"""
from __future__ import annotations

import math

import torch

from .. import _compile
from .._validate import capturing, check_finite, check_reduction, check_same_device, check_tensor, nonfinite_rows

# RS-IMLE: the first knn call asks for this many neighbours; examples whose K nearest are all
# rejected are searched again with K multiplied by _RS_GROWTH, up to every sample (exact).
_RS_K0 = 8
_RS_GROWTH = 4


def _knn(query, key, k, backend):
    import fastgen  # the public NN search (late import: fastgen imports this module)

    return fastgen.knn(query, key, k, backend=backend)


def check_backend(backend) -> str:
    from .._dispatch import BACKENDS

    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    return backend


def check_radius(rejection_radius) -> float:
    if isinstance(rejection_radius, bool) or not isinstance(rejection_radius, (int, float)):
        raise TypeError(f"rejection_radius must be a float, got {type(rejection_radius).__name__}")
    r = float(rejection_radius)
    if not math.isfinite(r) or r < 0:
        raise ValueError(f"rejection_radius must be a finite float >= 0, got {rejection_radius!r}")
    return r


def nearest_eligible(query: torch.Tensor, key: torch.Tensor, rejection_radius: float = 0.0,
                     *, backend: str = "auto", k0: int = _RS_K0):
    """Nearest key of each query among the keys at Euclidean distance >= rejection_radius.

    query [B, N, D], key [B, M, D] (already validated; same dtype and device). Returns
    (dist2 float32 [B, N], index int64 [B, N], found bool [B, N], dist2_0 [B, N], index_0 [B, N])
    where (dist2_0, index_0) is the unconstrained nearest key. Ties go to the lowest key index
    (fastgen.knn's rule). Where no key is eligible, found is False, dist2 is +inf, index 0.

    Exactness: the first search asks fastgen.knn for K = min(M, k0) neighbours and takes the
    first one at distance >= radius; examples whose K neighbours are all rejected are searched
    again with K x 4 (only those examples, or only the conditions holding them), until K = M,
    which settles every example exactly. Eligibility is decided on knn's fp32 distances.
    """
    B, N, _ = query.shape
    M = key.shape[1]
    with torch.no_grad():
        if rejection_radius <= 0:
            d, i = _knn(query, key, 1, backend)
            d, i = d[..., 0].float(), i[..., 0]
            return d, i, torch.ones_like(d, dtype=torch.bool), d, i
        r2 = rejection_radius * rejection_radius
        K = min(M, k0)
        d, i = _knn(query, key, K, backend)
        d = d.float()
        d0, i0 = d[..., 0].clone(), i[..., 0].clone()
        out_d = torch.full((B, N), float("inf"), dtype=torch.float32, device=query.device)
        out_i = torch.zeros((B, N), dtype=torch.int64, device=query.device)
        found = torch.zeros((B, N), dtype=torch.bool, device=query.device)

        def settle(dk, ik, rows_b, rows_n):
            ok = dk >= r2                                    # [R, K] eligible
            has = ok.any(-1)
            first = ok.to(torch.int8).argmax(-1)             # first eligible column
            pick_d = dk.gather(-1, first[:, None])[:, 0]
            pick_i = ik.gather(-1, first[:, None])[:, 0]
            rb, rn = rows_b[has], rows_n[has]
            out_d[rb, rn] = pick_d[has]
            out_i[rb, rn] = pick_i[has]
            found[rb, rn] = True

        all_b = torch.arange(B, device=query.device).repeat_interleave(N)
        all_n = torch.arange(N, device=query.device).repeat(B)
        settle(d.reshape(B * N, K), i.reshape(B * N, K), all_b, all_n)
        while K < M:
            pending = ~found
            if not bool(pending.any()):
                break
            K = min(M, K * _RS_GROWTH)
            if B == 1:       # one key set: search again for the pending queries only
                rows_n = pending[0].nonzero()[:, 0]
                dk, ik = _knn(query[:, rows_n], key, K, backend)
                rows_b = torch.zeros_like(rows_n)
                settle(dk.float().reshape(-1, K), ik.reshape(-1, K), rows_b, rows_n)
            else:            # per-condition key sets: search again the conditions with pending rows
                bs = pending.any(1).nonzero()[:, 0]
                dk, ik = _knn(query[bs], key[bs], K, backend)    # [b, N, K]
                sub = pending[bs]                                # [b, N]
                rows_b = bs[:, None].expand(-1, N)[sub]
                rows_n = torch.arange(N, device=query.device)[None].expand(len(bs), -1)[sub]
                settle(dk.float()[sub], ik[sub], rows_b, rows_n)
        return out_d, out_i, found, d0, i0


def _as_batched(samples, data, conditional):
    """Validate shapes; return samples [B, S, D], data [B, N, D], and the shape of a 'none'
    reduction."""
    if conditional:
        if samples.dim() < 2:
            raise ValueError(f"samples must be [B, S, ...] when conditional=True, got shape {tuple(samples.shape)}")
        B, S = samples.shape[:2]
        feat = samples.shape[2:]
        if data.dim() == samples.dim() - 1:
            if data.shape[0] != B or data.shape[1:] != feat:
                raise ValueError(f"data must be [B, N, ...] or [B, ...] matching samples [B, S, ...] = "
                                 f"{tuple(samples.shape)}, got shape {tuple(data.shape)}")
            out_shape = (B,)
            data = data.unsqueeze(1)
        elif data.dim() == samples.dim():
            if data.shape[0] != B or data.shape[2:] != feat:
                raise ValueError(f"data must be [B, N, ...] or [B, ...] matching samples [B, S, ...] = "
                                 f"{tuple(samples.shape)}, got shape {tuple(data.shape)}")
            out_shape = tuple(data.shape[:2])
        else:
            raise ValueError(f"data must have samples.dim() or samples.dim() - 1 dimensions when "
                             f"conditional=True: samples {tuple(samples.shape)}, data {tuple(data.shape)}")
        D = math.prod(feat)
        return samples.reshape(B, S, D), data.reshape(B, data.shape[1], D), out_shape
    if samples.dim() < 1 or data.dim() < 1:
        raise ValueError("samples and data must have at least one dimension")
    if samples.shape[1:] != data.shape[1:]:
        raise ValueError(f"samples [S, ...] and data [N, ...] must have the same trailing shape, got "
                         f"samples {tuple(samples.shape)} and data {tuple(data.shape)}"
                         + (" (pass conditional=True for [B, S, ...] samples)" if data.dim() == samples.dim() - 1 else ""))
    D = math.prod(samples.shape[1:])
    return samples.reshape(1, samples.shape[0], D), data.reshape(1, data.shape[0], D), (data.shape[0],)


# ---------------------------------------------------------------------------------------------
# the op fastgen::imle_nearest: the data-dependent neighbour search (no gradient: it returns
# indices), called by imle_loss in eager and compiled code alike; the loss is traced around it
# ---------------------------------------------------------------------------------------------
def _nearest_impl(data, samples, rejection_radius, backend):
    """data [B, N, D], samples [B, S, D] (one dtype, no grad) -> (index int64 [B, N] of the
    nearest eligible sample, found bool [B, N]). NaN / inf inputs raise ValueError naming them,
    except while a CUDA graph is being captured (no host read allowed: imle_loss then turns the
    rows of :func:`_capture_mask` into NaN). RS-IMLE's widening search reads the device, so it
    cannot be captured (RuntimeError)."""
    if capturing(samples):
        if rejection_radius > 0:
            raise RuntimeError("imle_loss with rejection_radius > 0 (RS-IMLE) cannot be captured in a CUDA graph: "
                               "its search widens on the host for the examples still pending")
    else:
        check_finite("samples", samples)
        check_finite("data", data)
    _, index, found, _, _ = nearest_eligible(data, samples, rejection_radius, backend=backend)
    return index, found


def _nearest_fake(data, samples, rejection_radius, backend):
    B, N, _ = data.shape
    return data.new_empty((B, N), dtype=torch.int64), data.new_empty((B, N), dtype=torch.bool)


def _nearest_vmap(info, in_dims, data, samples, rejection_radius, backend):
    """vmap rule: one search with V folded into the examples or the condition batch
    (conditional IMLE; :func:`fastgen._compile.fold_search_vmap`)."""
    return _compile.fold_search_vmap(info, in_dims, data, samples,
                                     lambda x, s: _op_nearest(x, s, rejection_radius, backend))


# no autograd kernel: the outputs are an index and a mask (the inputs reach it detached)
_op_nearest = _compile.define("imle_nearest", "(Tensor data, Tensor samples, float rejection_radius, str backend) "
                              "-> (Tensor, Tensor)", _nearest_impl, fake=_nearest_fake, vmap=_nearest_vmap)


def _capture_mask(data, samples, r):
    """The device mask [B, N] of examples whose loss is undefined (non-finite example, or any
    non-finite sample of its condition) when the call may be captured in a CUDA graph (the op
    cannot raise then); else None. Under torch.compile a CUDA call may be replayed inside a
    graph later (mode="reduce-overhead"), so the mask is traced for every CUDA call with r == 0."""
    if r > 0:
        return None
    if capturing(samples) or (samples.is_cuda and _compile.is_compiling()):
        return nonfinite_rows(data) | nonfinite_rows(samples).any(-1, keepdim=True)
    return None


def imle_loss(samples: torch.Tensor, data: torch.Tensor, *, conditional: bool = False,
              rejection_radius: float = 0.0, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """IMLE loss: mean over data examples of the squared distance to their nearest sample.

    loss = 1/N sum_i min_j ||data_i - samples_j||^2 over flattened features (Li & Malik 2018,
    "Implicit Maximum Likelihood Estimation", arXiv 1809.09087, Algorithm 1).

    Args:
        samples: [S, ...] generator outputs, float32 / float16 / bfloat16 / float64.
            With ``conditional=True``: [B, S, ...], S samples for each of B conditions.
        data: [N, ...] examples with the same trailing shape as ``samples`` (cast to
            ``samples.dtype``). With ``conditional=True``: [B, N, ...] (N examples per
            condition) or [B, ...] (one example per condition); example i of condition b only
            sees the samples of condition b (one batched knn call, no loop over B).
        rejection_radius: RS-IMLE (Vashist et al. 2024, "Rejection Sampling IMLE"): samples at
            Euclidean distance < rejection_radius from data_i are not eligible for data_i.
            An example with no eligible sample at all is already within the radius of every
            sample: it contributes 0 (no pull) and still counts in the mean.
        reduction: "mean" (over examples, and conditions), "sum" or "none" (per example:
            [N], [B, N] or [B]).
        backend: backend of the nearest-neighbour search (see :func:`fastgen.knn`).

    Returns:
        The loss in ``samples.dtype`` (accumulated in float32, or float64 for float64 inputs).
        Differentiable w.r.t. ``samples`` only; ``data`` gets no gradient.

    Raises:
        TypeError: non-tensor or integer inputs, a non-float rejection_radius.
        ValueError: shape mismatch, empty inputs, NaN / inf values, inputs on different devices,
            rejection_radius < 0, an unknown reduction.

    Neighbour choice: exact (fastgen.knn); ties go to the lowest sample index. With
    rejection_radius > 0 the K = 8 nearest samples are searched first and the search widens
    (x4) for the examples whose K nearest are all rejected, until every sample is covered.

    PyTorch integration: the neighbour search (data-dependent for RS-IMLE) is one custom op,
    ``torch.ops.fastgen.imle_nearest`` (indices only: no gradient), in eager and compiled code
    alike; the loss around it is plain torch, so ``torch.compile(fullgraph=True)``, double
    backward, forward-mode AD (``torch.func.jvp``), ``torch.func.hessian`` / ``jacrev`` /
    ``jacfwd`` work. ``torch.func.vmap`` maps the vmapped dim onto the search's batch: onto the
    examples when ``samples`` is not vmapped, onto the condition batch (the conditional path)
    when it is: one search, not a loop; ``vmap(grad(...))`` gives per-sample gradients. The
    finite-input check runs inside the op. With ``rejection_radius=0`` the call can be captured
    in a CUDA graph (no host read: the search is :func:`fastgen.knn`'s capture path);
    non-finite inputs then give a NaN loss instead of the ValueError. RS-IMLE cannot be
    captured (RuntimeError).
    """
    check_tensor("samples", samples)
    check_tensor("data", data)
    check_same_device(samples=samples, data=data)
    if not isinstance(conditional, bool):
        raise TypeError(f"conditional must be a bool, got {type(conditional).__name__}")
    r = check_radius(rejection_radius)
    check_reduction(reduction)
    check_backend(backend)
    s, x, out_shape = _as_batched(samples, data, conditional)
    if x.dtype != s.dtype:
        x = x.to(s.dtype)
    x = x.detach()
    sd = s.detach()
    index, found = _op_nearest(x, sd, r, backend)     # the search: one custom op, eager and compiled
    bad = _capture_mask(x, sd, r)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    picked = torch.gather(s, 1, index[..., None].expand(-1, -1, s.shape[-1]))   # [B, N, D]
    diff = x.to(acc) - picked.to(acc)
    per = (diff * diff).sum(-1)
    if r > 0:
        per = torch.where(found, per, torch.zeros_like(per))
    if bad is not None:
        per = torch.where(bad, torch.full_like(per, float("nan")), per)
    per = per.reshape(out_shape)
    if reduction == "mean":
        out = per.mean()
    elif reduction == "sum":
        out = per.sum()
    else:
        out = per
    return out.to(s.dtype)
