"""torch.compile / custom-op helpers shared by the ops (torch >= 2.4).

Every public op of fastgen is a torch custom op (``torch.library.custom_op``) with a fake
(meta) kernel and a registered autograd formula, so that ``torch.compile(fullgraph=True)``
traces through it without a graph break. The op's implementation still asks
:func:`fastgen._dispatch.select` for the backend when it runs, so ``use_backend`` and
``FASTGEN_BACKEND`` keep working inside compiled code.

The eager path of an op may skip the custom op (to keep eager-only fast paths such as an
in-place gradient scale): :func:`is_compiling` tells the two apart.
"""
from __future__ import annotations

import torch

NAMESPACE = "fastgen"

if not hasattr(torch.library, "custom_op"):  # pragma: no cover - torch < 2.4
    raise ImportError(f"fastgen needs torch >= 2.4 (torch.library.custom_op); found torch {torch.__version__}")

custom_op = torch.library.custom_op


def op(name: str, schema: str):
    """``torch.library.custom_op("fastgen::<name>")`` with an explicit schema (no mutation):
    torch 2.4 cannot infer one from the string annotations of ``from __future__ import
    annotations`` modules."""
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=schema)


def is_compiling() -> bool:
    """True while torch.compile (dynamo) traces the caller."""
    fn = getattr(torch.compiler, "is_compiling", None)  # torch >= 2.3
    if fn is not None:
        return bool(fn())
    return bool(torch._dynamo.is_compiling())  # pragma: no cover


def fresh_empty(like: torch.Tensor) -> torch.Tensor:
    """A new 0-element tensor: a custom op may not return one tensor twice or alias an input."""
    return like.new_empty(0)
