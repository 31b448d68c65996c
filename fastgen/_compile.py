"""One torch custom op per public function: definition helpers shared by the ops.

Every public op of fastgen is ONE operator ``fastgen::<name>``, called in eager mode and under
torch.compile / torch.export alike. :func:`define` declares it and registers, once, on that op:

* the implementation (``CompositeExplicitAutograd``: every device), which asks
  :func:`fastgen._dispatch.run` for the backend when it runs (so ``use_backend`` and
  ``FASTGEN_BACKEND`` work inside compiled code);
* the fake kernel (shapes only; torch.compile, torch.export, opcheck);
* the autograd kernel: a :class:`OpFunction` subclass whose ``backward`` is differentiable
  (double backward, forward-over-reverse) and whose ``jvp`` gives forward-mode AD;
* the vmap rule (``torch.library.register_vmap``): torch.func.vmap over the op, and with the
  autograd kernel, vmap(grad), jacrev, jacfwd and hessian.

Internal kernels (a backward pass, a compiled C++ kernel) are underscore-named ops with fake
kernels. Why a hand-registered autograd kernel rather than ``torch.library.register_autograd``:
the latter has no forward-mode AD (torch 2.4 - 2.14); an ``autograd.Function`` with ``jvp``
registered at the ``Autograd`` key has both, and works under torch.func (applied as a single-level
function: the functorch layer that called the op already unwrapped its tensors).
"""
from __future__ import annotations

import torch

NAMESPACE = "fastgen"

if not hasattr(torch.library, "register_vmap"):  # pragma: no cover - torch < 2.4
    raise ImportError(f"fastgen needs torch >= 2.4 (torch.library.register_vmap); found torch {torch.__version__}")

from torch._functorch.utils import enable_single_level_autograd_function  # noqa: E402
from torch.autograd import forward_ad as _fwAD  # noqa: E402
from torch.autograd.forward_ad import _set_fwd_grad_enabled  # noqa: E402

LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # (fastgen._C holds the DEF of the C++ kernels)


def op(name: str, schema: str):
    """``torch.library.custom_op("fastgen::<name>")`` with an explicit schema (no mutation), for
    internal ops (underscore names) that need no autograd: torch 2.4 cannot infer a schema from the
    string annotations of ``from __future__ import annotations`` modules."""
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=schema)


class OpFunction(torch.autograd.Function):
    """Base of the autograd kernel of an op made by :func:`define`.

    Subclasses define ``setup_context(ctx, inputs, output)``, ``backward(ctx, *grads)`` and
    ``jvp(ctx, *tangents)``, with one entry per op argument (None for non-tensor arguments).
    ``backward`` must be differentiable when ``torch.is_grad_enabled()`` (create_graph=True, and
    always under torch.func): use plain torch ops there, or ops with their own autograd.
    :func:`fast_backward` tells when an eager-only fast path may run instead."""

    op = None  # the OpOverload, set by define()

    @classmethod
    def forward(cls, *args):
        if torch._C._are_functorch_transforms_active():
            # Function.apply runs forward with grad mode and forward grad off; the op below this
            # level must still be recorded by the outer torch.func levels (jacrev(grad(f)),
            # jacfwd(jacrev(f)) = hessian, grad of a function of the output), as
            # torch._functorch.autograd_function does for Functions: turn both back on.
            # _AutoDispatchBelowAutograd keeps this level from recording the op twice.
            with torch.enable_grad(), _set_fwd_grad_enabled(True), torch._C._AutoDispatchBelowAutograd():
                return cls.op(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return cls.op(*args)


def needs_autograd(args) -> bool:
    """Whether an autograd kernel must record this call: a torch.func transform is active, a
    forward-AD dual level is open (``torch.autograd.forward_ad.dual_level``), or grad mode is on and
    a tensor argument requires grad. When not, the op runs below autograd directly, without an
    ``autograd.Function`` node (as torch.library.custom_op's own autograd kernel does): the per-call
    cost of inference / no-grad calls stays that of the op."""
    if torch._C._are_functorch_transforms_active() or _fwAD._current_level >= 0:
        return True
    return torch.is_grad_enabled() and torch._C._any_requires_grad(*args)


def fast_backward(*grads) -> bool:
    """True in a backward that need not be differentiable (no create_graph, no torch.func
    transform) and whose incoming ``grads`` are not BatchedTensors of the legacy vmap
    (``autograd.grad(is_grads_batched=True)``, gradcheck's check_batched_grad, which neither turns
    grad mode on nor activates a torch.func transform): a fused, non-differentiable backward kernel
    may run."""
    return (not torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()
            and not any(isinstance(g, torch.Tensor) and torch._C._functorch.is_legacy_batchedtensor(g)
                        for g in grads))


def define(name: str, schema: str, impl, *, fake, autograd: type[OpFunction] | None = None, vmap=None,
           pass_grad_mode: bool = False):
    """Declare ``fastgen::<name><schema>`` and register impl / fake / autograd / vmap on it (see the
    module doc). Returns the OpOverload (call it like a function). ``pass_grad_mode``: the autograd
    Function's forward gets the caller's ``torch.is_grad_enabled()`` as one more argument (the
    forward itself runs with grad disabled and cannot see it), e.g. to compute fused gradients
    only when a backward can follow."""
    LIB.define(name + schema)
    qual = f"{NAMESPACE}::{name}"
    LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(qual, fake, lib=LIB)
    overload = getattr(torch.ops.fastgen, name).default
    if autograd is not None:
        autograd.op = overload
        if "jvp" in vars(autograd):  # every op: forward-over-forward raises instead of a missing term
            _jvp = vars(autograd)["jvp"].__func__

            def jvp(ctx, *tangents, _jvp=_jvp, _name=name):
                forbid_forward_over_forward(_name)
                return _jvp(ctx, *tangents)

            autograd.jvp = staticmethod(jvp)
        apply = super(torch.autograd.Function, autograd).apply  # the single-level Function.apply

        def autograd_kernel(*args):
            if not needs_autograd(args):  # nothing can record this call: no Function node
                with torch._C._AutoDispatchBelowAutograd():
                    return overload(*args)
            with enable_single_level_autograd_function():
                return apply(*args, torch.is_grad_enabled()) if pass_grad_mode else apply(*args)

        LIB.impl(name, autograd_kernel, "Autograd")
    if vmap is not None:
        torch.library.register_vmap(qual, vmap, lib=LIB)
    return overload


def move_bdim(x, bdim, size: int):
    """Helper for vmap rules: ``x`` with its batch dim first (broadcast when it has none)."""
    if x is None or not isinstance(x, torch.Tensor):
        return x
    if bdim is None:
        return x.expand(size, *x.shape)
    return x.movedim(bdim, 0)


def fold_search_vmap(info, in_dims, x, y, search):
    """vmap rule of a batched search of x [B, N, D] against y [B, M, D] (knn, imle_nearest): the
    vmapped dim V goes onto the search's own dims, one call to ``search(x, y)`` -> tensors
    [B', N', ...]. y not batched: V folds into x's rows ([V, B, N, D] -> [B, V*N, D]; a view when
    B == 1, y not copied). y batched: V folds into the batch ([V*B, N, D] x [V*B, M, D]). Exact
    either way: every row is searched on its own. Returns (outputs, out_dims)."""
    V = info.batch_size
    xd, yd = in_dims[0], in_dims[1]
    if yd is None:
        xs = x.movedim(xd, 1)                                                 # [B, V, N, D]
        B, _, N, D = xs.shape
        outs = search(xs.reshape(B, V * N, D), y)
        return tuple(o.view(B, V, N, *o.shape[2:]) for o in outs), (1,) * len(outs)
    ys = y.movedim(yd, 0)                                                     # [V, B, M, D]
    xs = move_bdim(x, xd, V)                                                  # [V, B, N, D]
    _, B, N, D = xs.shape
    outs = search(xs.reshape(V * B, N, D), ys.reshape(V * B, *ys.shape[2:]))
    return tuple(o.view(V, B, N, *o.shape[2:]) for o in outs), (0,) * len(outs)


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the caller."""
    fn = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    if fn is not None:
        return bool(fn())
    return bool(torch._dynamo.is_compiling())  # pragma: no cover


def fresh_empty(like: torch.Tensor) -> torch.Tensor:
    """A new 0-element tensor: a custom op may not return one tensor twice or alias an input."""
    return like.new_empty(0)


def forbid_forward_over_forward(name: str) -> None:
    """Runs first in every :func:`define`'d ``jvp`` (define wraps it): raise NotImplementedError when two
    forward-mode transforms are nested (``jacfwd(jacfwd(f))``, ``jvp`` of ``jvp``). The jvp
    formula then runs below the outer forward level, which does not see it: the second-order
    term would be silently missing (as for torch's own autograd.Function jvp). Forward-over-
    reverse (``jacfwd(jacrev(f))`` = ``torch.func.hessian``) and reverse-over-forward work."""
    stack = torch._C._functorch.get_interpreter_stack() or ()
    if sum(1 for i in stack if i.key() == torch._C._functorch.TransformType.Jvp) >= 2:
        raise NotImplementedError(
            f"fastgen.{name}: forward-over-forward AD (jacfwd(jacfwd(f)), jvp of jvp) is not supported "
            "(the op's jvp formula is not itself forward-differentiable); use torch.func.hessian / "
            "jacfwd(jacrev(f)) or jacrev(jacrev(f))")
