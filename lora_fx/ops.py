"""The functions that adapted graphs call: the only LoRA math in a lowered graph.

Every function here takes one adapter's factors ``(lora_A, lora_B, scaling)`` with
``lora_A: (rank, fan_in)``, ``lora_B: (fan_out, rank)``, ``scaling``: 0-dim tensor, and
``ΔW = scaling · (lora_B @ lora_A).reshape(W.shape)`` (Hu et al., 2022, eq. 3).  Several adapters
on one weight are chains of calls, each taking the previous result as its first argument, so a
pass can add or remove one adapter by rewiring a single node.

Two lowerings compute the same function of the inputs:

* *merge*: ``op(x, W + ΔW)``: :func:`merge` feeds the original op an out-of-place merged weight.
  Works for any op.
* *factored*: ``op(x, W) + s·op_B(op_A(x))`` for ops linear in their weight
  (:func:`linear_delta`, :func:`matmul_delta`, :func:`embedding_delta`, :func:`conv_delta`):
  no weight-sized temporary and no ``(fan_out, fan_in)`` weight gradient.

Dtypes: the factors may be in another dtype than the base (e.g. fp32 adapters on a bf16 model);
the delta is computed in the adapter dtype and cast once to the base value's dtype, so every
function returns the dtype of its first argument.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "delta_weight",
    "merge",
    "linear_delta",
    "matmul_delta",
    "embedding_delta",
    "conv_delta",
    "module_call",
    "LORA_OPS",
    "DELTA_OPS",
]


def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: Tensor, shape: Sequence[int]) -> Tensor:
    """``ΔW = scaling · (lora_B @ lora_A).reshape(shape)``.

    Args:
        lora_A: ``(rank, prod(shape[1:]))``.
        lora_B: ``(shape[0], rank)``.
        scaling: 0-dim tensor (``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA).
        shape: the base weight's shape.

    Returns:
        ``ΔW`` of ``shape`` in the factors' dtype.
    """
    return (lora_B @ (lora_A * scaling)).reshape(shape)


def merge(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor) -> Tensor:
    """Out-of-place merged weight ``W + ΔW`` in ``W``'s dtype (merge lowering).

    ``W`` is never written; autograd sees ``ΔW`` as a function of ``lora_A`` and ``lora_B``.
    """
    delta = delta_weight(lora_A, lora_B, scaling, weight.shape)
    return weight + delta.to(weight.dtype)


def _to(x: Tensor, like: Tensor) -> Tensor:
    return x if x.dtype == like.dtype else x.to(like.dtype)


def linear_delta(y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor) -> Tensor:
    """``y + s·(x Aᵀ) Bᵀ``: factored LoRA for ``y = F.linear(x, W, b)`` with ``W: (out, in)``.

    Shapes: ``x (..., in)``, ``y (..., out)``; returns ``(..., out)`` in ``y``'s dtype.
    """
    h = F.linear(_to(x, lora_A), lora_A) * scaling
    return y + _to(F.linear(h, lora_B), y)


def matmul_delta(
    y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor, weight_on_left: bool = False
) -> Tensor:
    """Factored LoRA for ``y = x @ W`` (``W: (in, out)``; e.g. GPT-2's Conv1D, ``addmm``) or, with
    ``weight_on_left=True``, for ``y = W @ x`` (``W: (out, in)``).

    ``ΔW = s·B@A`` with ``B: (W.shape[0], r)``, ``A: (r, W.shape[1])``, so ``x @ ΔW = s·(x@B)@A`` and
    ``ΔW @ x = s·B@(A@x)``.  Returns ``y``'s shape and dtype.
    """
    if weight_on_left:
        return y + _to(lora_B @ ((lora_A * scaling) @ _to(x, lora_A)), y)
    return y + _to((_to(x, lora_B) @ lora_B) @ (lora_A * scaling), y)


def embedding_delta(
    y: Tensor,
    indices: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    padding_idx: int | None = None,
    scale_grad_by_freq: bool = False,
) -> Tensor:
    """``y + s·F.embedding(indices, B) @ A``: factored LoRA for ``y = F.embedding(indices, W)``,
    ``W: (num_embeddings, dim)``, ``B: (num_embeddings, r)``, ``A: (r, dim)``.

    ``padding_idx`` and ``scale_grad_by_freq`` act on the gradients of *both* factors exactly as
    they act on ``ΔW``'s in ``F.embedding(indices, W + ΔW, ...)``: positions holding
    ``padding_idx`` send no gradient to ``A`` or ``B``, and each position's gradient is divided
    by its index's count in the batch.  The forward value is unchanged by either option.
    """
    rows = F.embedding(indices, lora_B)
    delta = rows @ (lora_A * scaling)
    if padding_idx is not None or scale_grad_by_freq:
        weight = torch.ones(indices.shape, dtype=delta.dtype, device=delta.device)
        if padding_idx is not None:
            pad = padding_idx if padding_idx >= 0 else lora_B.shape[0] + padding_idx
            weight = weight * (indices != pad).to(delta.dtype)
        if scale_grad_by_freq:
            flat = indices.reshape(-1)
            counts = torch.zeros(lora_B.shape[0], dtype=delta.dtype, device=delta.device).index_add_(
                0, flat, torch.ones(flat.shape, dtype=delta.dtype, device=delta.device))
            weight = weight / counts[indices]
        fixed = delta.detach()  # same value; gradient scaled per position
        delta = fixed + (delta - fixed) * weight.unsqueeze(-1)
    return y + _to(delta, y)


_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_delta(
    y: Tensor,
    x: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: Tensor,
    kernel_size: tuple[int, ...],
    stride: tuple[int, ...] | int,
    padding: tuple[int, ...] | int | str,
    dilation: tuple[int, ...] | int,
) -> Tensor:
    """Factored LoRA for an ungrouped convolution ``y = convNd(x, W)``, ``W: (out, in, *k)``:
    ``y + s·conv1x1(convNd(x, A.view(r, in, *k)), B.view(out, r, 1, ...))``.

    Exact because convolution is linear in its kernel and ``ΔW = B@A`` factors over the output
    channel (PEFT's Conv layer uses the same decomposition).  Only valid for ``groups == 1``.
    """
    nd = len(kernel_size)
    conv = _CONV[nd]
    rank = lora_A.shape[0]
    a = lora_A.reshape(rank, -1, *kernel_size)
    b = lora_B.reshape(lora_B.shape[0], rank, *([1] * nd))
    h = conv(_to(x, lora_A), a, None, stride, padding, dilation, 1) * scaling
    return y + _to(conv(h, b), y)


def module_call(module: torch.nn.Module, overrides: dict[str, Tensor], *args, **kwargs):
    """Call ``module(*args, **kwargs)`` with some parameters replaced (merge lowering of an opaque
    leaf module).  Mirrors :func:`torch.func.functional_call`; the module is not modified."""
    return torch.func.functional_call(module, overrides, args, kwargs, strict=False, tie_weights=False)


#: Ops whose first argument is the base value and which a pass may strip to fold or remove an adapter.
DELTA_OPS = (linear_delta, matmul_delta, embedding_delta, conv_delta)
LORA_OPS = (merge,) + DELTA_OPS + (module_call,)
