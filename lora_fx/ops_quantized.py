"""Graph ops for frozen quantized base weights (QLoRA, Dettmers et al., 2023): the base op of a
factored site on a quantized weight, and the merged call of a bitsandbytes linear.

* :func:`quantized_linear`: ``F.linear(x, W_q, b)`` with a frozen quantized ``W_q``.  Forward runs
  the weight kind's kernel (:meth:`lora_fx.weights.WeightKind.linear`); backward forms
  ``∂x = g · dequantize(W_q)``, dequantizing again instead of keeping a float copy: autograd saves
  only the quantized parameter itself, never a weight-sized float tensor (torchao's own linear
  backward keeps one per int8 / intx / float8 layer).  No gradient reaches ``W_q`` or the bias
  (both frozen).  ``nn.Linear`` modules and ``F.linear`` calls on weights whose kind has
  :attr:`~lora_fx.weights.WeightKind.frozen_linear` are routed here by
  :mod:`lora_fx.passes.route_quantized`; fold routes them back.
* :func:`bnb_linear`: what bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` compute, on a float
  weight (the merge lowering's ``dequantize(W) + ΔW``).

Both are :func:`lora_fx.ops.graph_op` s: the tracer keeps them as calls and the op table knows them
as ``linear`` sites (:mod:`lora_fx.rules.quantized`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import weights
from .errors import UnsupportedSiteError
from .ops import graph_op
from .recompute import as_rows

__all__ = ["quantized_linear", "bnb_linear"]


class _FrozenLinear(torch.autograd.Function):
    """``F.linear(x, W, b)`` for a frozen quantized ``W``: see :func:`quantized_linear`."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], name: str) -> Tensor:
        ctx.save_for_backward(weight)  # the parameter itself (alive anyway): no new memory
        ctx.name, ctx.x_dtype = name, x.dtype
        ctx.bias_grad = bias is not None and bias.requires_grad
        return weights.kind_of(weight).linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        kind = weights.kind_of(weight)
        if kind.input_grad(weight) == "none":
            raise UnsupportedSiteError(
                f"'{ctx.name or 'a linear layer'}' holds a {kind.name} weight, whose kernel has no backward: "
                "no gradient can flow through it to the layers before it. Train on a kind that has one (NF4, "
                "IntxWeightOnlyConfig(int4), int8, bitsandbytes 4-bit), keep this layer after every adapter "
                "you train (targets=/exclude=), or use this model for inference and adapter hot-swapping only.")
        grad_x = (grad @ kind.dequantize(weight).to(grad.dtype)).to(ctx.x_dtype)
        grad_b = as_rows(grad).sum(0) if ctx.bias_grad else None
        return grad_x, None, grad_b, None


@graph_op
def quantized_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, name: str = "") -> Tensor:
    """``F.linear(x, W, bias)`` for a frozen, possibly quantized ``W`` (see the module docstring).

    Args:
        x: ``(..., in)``.
        weight: logical shape ``(out, in)``; a plain tensor is simply ``F.linear`` (e.g. after a
            merge, or after fold).
        bias: ``(out,)`` or None.
        name: the weight's name, for error messages.

    Returns:
        ``(..., out)`` as the weight kind's kernel computes it.

    Raises:
        UnsupportedSiteError: in backward, for a kind whose kernel has no backward (torchao's
            int4 CPU layout), naming the weight.
    """
    kind = weights.kind_of(weight)
    if kind is weights.TENSOR:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _FrozenLinear.apply(x, weight, bias, name)
    return kind.linear(x, weight, bias)


@graph_op
def bnb_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], compute_dtype: Optional[torch.dtype],
               state=None, training: bool = True) -> Tensor:
    """What bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` compute, without their state: ``x`` and
    the bias cast to ``compute_dtype`` (None: ``x``'s dtype), the linear, the result cast back to
    ``x``'s dtype; nothing is cast or repacked in place.

    ``weight`` (logical shape ``(out, in)``) is the module's own quantized weight (the kind's kernel
    runs: ``bitsandbytes.matmul_4bit``; 8-bit through :func:`quantized_linear`) or, merged, a float
    ``dequantize(W) + ΔW``.  An 8-bit weight given with its module's ``state``
    (``bitsandbytes.MatmulLtState``) and ``training`` flag computes as ``Linear8bitLt.forward``
    does: ``bitsandbytes.matmul`` (LLM.int8: the input quantized to int8) except in training on
    CPU / XPU, where bitsandbytes too dequantizes the weight; under ``torch.compile`` the
    dequantized form runs.  Returns ``(..., out)`` in ``x``'s dtype.
    """
    dtype = compute_dtype or x.dtype
    b = None if bias is None else bias.to(dtype)
    kind = weights.kind_of(weight)
    if kind is weights.TENSOR:
        out = F.linear(x.to(dtype), weight.to(dtype), b)
    elif state is not None and (out := kind.module_linear(x.to(dtype), weight, b, state, training)) is not None:
        pass
    elif kind.frozen_linear:
        out = quantized_linear(x.to(dtype), weight, b)
    else:
        out = kind.linear(x.to(dtype), weight, b)
    return out.to(x.dtype)
