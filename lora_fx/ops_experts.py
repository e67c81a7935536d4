"""Graph ops for per-expert adapters on stacked expert weights ``W (E, d1, d2)``.

An expert adapter holds ``lora_A (E, r, in)`` and ``lora_B (E, out, r)``; expert ``e``'s update is
``ΔW[e] = scaling · lora_B[e] @ lora_A[e]``, an ``(out, in)`` matrix in the orientation the op
consumes (``F.linear(x, W[e])``).  A stack stored ``(E, in, out)`` (``x @ W[e]``; transformers'
``is_transposed`` experts) is *transposed*: its storage receives ``ΔW[e]ᵀ``.

* :func:`lora_weight` (a merge-family op: its first argument is the base weight, so fold and
  ``delete_adapter`` strip it like :func:`lora_fx.ops.merge`) hands the consuming code a
  :class:`~lora_fx.lazy_weight.LoraWeight`, which computes every factored consumer per expert
  (``F.linear(x, W[e]) + s·(x A[e]ᵀ) B[e]ᵀ`` and its grouped / batched forms) without ever building
  an ``(E, out, in)`` delta;
* :func:`expert_delta_weight` is the full ``ΔW`` stack, for fold only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .lazy_weight import LoraWeight
from .ops import merge_op

__all__ = ["lora_weight", "expert_delta_weight"]


@merge_op
def lora_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor, transposed: bool = False,
                dropout: Optional[nn.Module] = None) -> Tensor:
    """``W + ΔW`` as a lazy :class:`~lora_fx.lazy_weight.LoraWeight` (no weight-sized temporary).

    Several adapters on one weight are a chain (``lora_weight(lora_weight(W, A1, ...), A2, ...)``):
    the result carries every adapter's factors.

    Args:
        weight: the stack ``W (E, d1, d2)`` (or a :class:`LoraWeight` of it: another adapter).
        lora_A: ``(E, r, in)``; lora_B: ``(E, out, r)``; ``(out, in) = (d1, d2)``, or ``(d2, d1)``
            when ``transposed``.
        scaling: 0-dim tensor (``alpha / r · mix · enabled``).
        transposed: the stack is stored ``(E, in, out)``.
        dropout: LoRA dropout on each factored consumer's input (a module, or None).

    Returns:
        A :class:`LoraWeight` with ``W``'s shape, dtype and data.
    """
    factor = (lora_A, lora_B, scaling, dropout)
    if isinstance(weight, LoraWeight):
        with torch._C.DisableTorchFunctionSubclass():
            return LoraWeight(weight._w, weight._f + (factor,), weight._t)
    return LoraWeight(weight, (factor,), transposed)


def expert_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: Tensor, transposed: bool = False) -> Tensor:
    """``ΔW = scaling · lora_B @ lora_A`` per expert: ``(E, out, in)``, or ``(E, in, out)`` when
    ``transposed`` (the storage layout of the stack), in the factors' dtype.

    Args:
        lora_A: ``(E, r, in)``; lora_B: ``(E, out, r)``; scaling: 0-dim tensor.
    """
    d = lora_B @ (lora_A * scaling)
    return d.transpose(-2, -1) if transposed else d
