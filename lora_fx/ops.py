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

Every function a lowered graph calls registers itself with a decorator (:func:`delta_op`,
:func:`merge_op`, :func:`graph_op`), which fills :data:`DELTA_OPS`, :data:`MERGE_OPS` and
:data:`LORA_OPS`: the passes that strip adapters (fold, delete) and the tracer that keeps these
calls as leaves read those tables, so a new op is known everywhere once it is decorated.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import weights
from .act_mul import act_mul
from .recompute import _to, as_rows, down, recompute_point

__all__ = [
    "delta_op",
    "merge_op",
    "graph_op",
    "delta_weight",
    "merge",
    "dora_merge",
    "linear_delta",
    "matmul_delta",
    "embedding_delta",
    "embedding_up",
    "conv_delta",
    "module_call",
    "dequantized",
    "recompute_point",
    "LORA_OPS",
    "DELTA_OPS",
    "MERGE_OPS",
]


#: Ops whose first argument is the base value ``y = op(x, W)`` and which return ``y + s·...``: a
#: pass may replace one by its first argument to fold or remove an adapter.  Filled by :func:`delta_op`.
DELTA_OPS: list[Callable[..., Tensor]] = []
#: Ops that take the base *weight* as first argument and return the weight the op sees.  Filled by
#: :func:`merge_op`.
MERGE_OPS: list[Callable[..., Tensor]] = []
#: Every function a lowered graph calls (delta, merge, and :func:`module_call`); the tracer keeps
#: them as leaves, so a pickled adapted module re-traces to the same graph.
LORA_OPS: list[Callable[..., object]] = []


def graph_op(fn):
    """Register ``fn`` as a function adapted graphs call (in :data:`LORA_OPS`); returns ``fn``."""
    if fn not in LORA_OPS:
        LORA_OPS.append(fn)
    return fn


def delta_op(fn):
    """Register ``fn(y, x, lora_A, lora_B, scaling, *extra) -> y + ΔW applied to x`` as a factored
    delta op (in :data:`DELTA_OPS` and :data:`LORA_OPS`); returns ``fn``.  Its policy (dropout,
    recomputation, fused adapters, when it is cheaper) is a :class:`lora_fx.rules.Factored` field."""
    if fn not in DELTA_OPS:
        DELTA_OPS.append(fn)
    return graph_op(fn)


def merge_op(fn):
    """Register ``fn(W, lora_A, lora_B, scaling, ...) -> W'`` as a merge op (in :data:`MERGE_OPS`
    and :data:`LORA_OPS`); returns ``fn``."""
    if fn not in MERGE_OPS:
        MERGE_OPS.append(fn)
    return graph_op(fn)


def delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: Tensor, shape: Sequence[int],
                 blocks: Sequence[tuple[int, bool]] | None = None) -> Tensor:
    """``ΔW = scaling · (lora_B @ lora_A).reshape(shape)``.

    Args:
        lora_A: ``(rank, prod(shape[1:]))``.
        lora_B: ``(shape[0], rank)``.
        scaling: 0-dim tensor (``alpha / rank``, or ``alpha / sqrt(rank)`` for rsLoRA).
        shape: the base weight's shape.
        blocks: fused weight (loralib's ``MergedLinear``): ``((rows, enabled), ...)`` splitting
            ``shape[0]``; then ``lora_A: (n_enabled·r, fan_in)`` stacks one ``A_i: (r, fan_in)`` per
            enabled block and ``lora_B: (Σ enabled rows, r)`` stacks the ``B_i``; ΔW's rows of
            block ``i`` are ``s·B_i@A_i`` and the rows of disabled blocks are exactly zero.

    Returns:
        ``ΔW`` of ``shape`` in the factors' dtype.
    """
    if blocks is None:
        return (lora_B @ (lora_A * scaling)).reshape(shape)
    return _blockwise(lora_A.new_zeros(tuple(shape)), blocks, 0, lambda start, stop, b0, i, r: (
        lora_B[b0:b0 + stop - start] @ (lora_A[i * r:(i + 1) * r] * scaling)).reshape(
            (stop - start,) + tuple(shape[1:])), lora_A)


@merge_op
def merge(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor,
          blocks: Sequence[tuple[int, bool]] | None = None) -> Tensor:
    """Out-of-place merged weight ``W + ΔW`` in ``W``'s dtype (merge lowering).

    ``W`` is never written; autograd sees ``ΔW`` as a function of ``lora_A`` and ``lora_B``.
    With ``blocks`` (a fused weight, see :func:`delta_weight`) the rows of disabled blocks are
    ``W``'s own rows, bit for bit.

    Args:
        weight: ``W`` of any shape ``(out, ...)`` and floating dtype.
        lora_A: ``(rank, prod(W.shape[1:]))`` (fused: ``(n_enabled·rank, ...)``).
        lora_B: ``(out, rank)`` (fused: ``(Σ enabled rows, rank)``).
        scaling: 0-dim tensor.

    Returns:
        ``W + ΔW`` of ``W``'s shape and dtype (Hu et al., 2022, eq. 3).
    """
    if blocks is None:
        delta = delta_weight(lora_A, lora_B, scaling, weight.shape)
        return weight + delta.to(weight.dtype)
    return _blockwise(weight, blocks, 0, lambda start, stop, b0, i, r: (
        lora_B[b0:b0 + stop - start] @ (lora_A[i * r:(i + 1) * r] * scaling)).reshape(
            (stop - start,) + tuple(weight.shape[1:])), lora_A)


def _blockwise(base: Tensor, blocks, dim: int, delta_of, lora_A: Tensor) -> Tensor:
    """``base`` with ``delta_of(block)`` added to the slices of enabled blocks along ``dim``
    (slices of disabled blocks are ``base``'s own values)."""
    r = lora_A.shape[0] // max(1, sum(1 for _, on in blocks if on))
    pieces, start, b0, i = [], 0, 0, 0
    for rows, on in blocks:
        piece = base.narrow(dim, start, rows)
        if on:
            piece = piece + _to(delta_of(start, start + rows, b0, i, r), base)
            b0 += rows
            i += 1
        pieces.append(piece)
        start += rows
    return torch.cat(pieces, dim)


@merge_op
def dora_merge(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor, magnitude: Tensor,
    base_scaling: Union[float, Tensor]
) -> Tensor:
    """Out-of-place DoRA weight (Liu et al., ICML 2024, eq. 5) in ``W``'s dtype (merge lowering)::

        V  = W + base_scaling · (lora_B @ lora_A).reshape(W.shape)
        D  = V[i] · (magnitude[i] / ‖V[i]‖₂)      (norm over each output row V[i] = V[i, ...]; a fresh
                                                adapter's factor is exactly 1: W' is W bit for bit)
        W' = lerp(W, D, g),  g = scaling / base_scaling

    ``g`` is the adapter's gate (``mix · enabled``): 1 gives exactly ``D``, 0 gives exactly ``W``
    (a disabled DoRA adapter leaves the op untouched), and a weight ``g`` scales the DoRA update
    ``D - W`` linearly.  The norm is differentiated (the paper's §4.3 and HF PEFT detach it to save
    memory; forward values are identical, gradients are those of the formula above).

    Args:
        weight: ``W`` of shape ``(out, ...)``, any floating dtype.
        lora_A: ``(rank, prod(W.shape[1:]))``; lora_B: ``(out, rank)``; magnitude: ``(out,)``.
        scaling: 0-dim tensor ``base_scaling · mix · enabled``.
        base_scaling: ``alpha / rank`` (or ``alpha / sqrt(rank)``): a Python float, or the
            adapter's 0-dim ``base_scale`` buffer (what adapted graphs pass, so hot-swaps of rank
            or alpha reach them without recompiling).

    Returns:
        ``W'`` of ``W``'s shape and dtype; computed in ``promote(W.dtype, lora_A.dtype)``.
    """
    compute = torch.promote_types(weight.dtype, lora_A.dtype)
    w = weight.to(compute)
    v = w + (lora_B.to(compute) @ (lora_A.to(compute) * base_scaling)).reshape(weight.shape)
    view = (-1,) + (1,) * (weight.ndim - 1)
    # clamped: an all-zero row (e.g. an embedding's padding row) stays zero instead of 0/0 = nan
    norm = torch.linalg.vector_norm(v.flatten(1), dim=1).clamp_min(torch.finfo(compute).tiny).reshape(view)
    # V · (m / ‖V‖): at init m is ‖W‖ computed the same way, so the factor is exactly 1 and W' is W bit for bit
    d = v * (magnitude.to(compute).reshape(view) / norm)
    gate = (scaling / base_scaling).to(compute)
    return torch.lerp(w, d, gate).to(weight.dtype)


def _up(y: Tensor, h: Tensor, up: Tensor) -> Tensor:
    """``y + h @ up`` (``h (..., r)``, ``up (r, out)``, ``y (..., out)``) in ``y``'s dtype: one GEMM
    with beta=1 (``torch.addmm``, no separate ``(..., out)`` add pass) where the dtypes and leading
    shapes agree, else the product added to ``y``."""
    if h.dtype == y.dtype == up.dtype and y.dim() > 0 and h.shape[:-1] == y.shape[:-1]:
        return torch.addmm(as_rows(y), as_rows(h), up).view(y.shape)
    return y + _to(h @ up, y)


@delta_op
def linear_delta(y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor,
                 blocks: Sequence[tuple[int, bool]] | None = None, remat: tuple | None = None) -> Tensor:
    """``y + s·(x Aᵀ) Bᵀ``: factored LoRA for ``y = F.linear(x, W, b)`` with ``W: (out, in)``.

    Shapes: ``x (..., in)``, ``y (..., out)``; returns ``(..., out)`` in ``y``'s dtype.  With
    ``blocks`` (fused weight, see :func:`delta_weight`): ``h = s·x Aᵀ`` once, then block ``i``'s
    output features get ``h_i B_iᵀ`` and disabled blocks' features are ``y``'s own, bit for bit.
    ``remat``: how to recompute ``x`` in backward instead of keeping it (:func:`lora_fx.recompute.down`).
    """
    h = down(x, lora_A, scaling, remat)
    if blocks is None:
        return _up(y, h, lora_B.t())
    return _blockwise(y, blocks, -1, lambda start, stop, b0, i, r: F.linear(
        h[..., i * r:(i + 1) * r], lora_B[b0:b0 + stop - start]), lora_A)


@delta_op
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
    # h = s·x B: the down-projection of this orientation (B: (in, r)), which may recompute x in
    # backward (a view of a tagged norm output: GPT-2's Conv1D reads ``ln(u).view(-1, d)``)
    return _up(y, down(x, lora_B.t(), scaling), lora_A)


@delta_op
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

    ``padding_idx`` and ``scale_grad_by_freq`` act on the factors' gradients exactly as on
    ``W``'s: ``W``'s gradient row ``k`` is ``G_k = Σ_{i: idx_i = k} w_i·g_i`` with ``w_i = 0`` at
    ``padding_idx`` and ``1/count(k)`` under ``scale_grad_by_freq``, so ``dA = s·Bᵀ G`` uses the
    same per-position weights (``B``'s rows get them from ``F.embedding`` itself).
    """
    rows = F.embedding(indices, lora_B, padding_idx, None, 2.0, scale_grad_by_freq, False)
    return embedding_up(y, indices, rows, lora_A * scaling, lora_B.shape[0], padding_idx, scale_grad_by_freq)


def embedding_up(y: Tensor, indices: Tensor, rows: Tensor, a: Tensor, num_embeddings: int,
                 padding_idx: int | None, scale_grad_by_freq: bool) -> Tensor:
    """``y + rows @ a`` where ``rows = F.embedding(indices, B, padding_idx, ..., scale_grad_by_freq)``
    (``(..., r)``) and ``a = s·A`` (``(r, dim)``), with ``a``'s gradient re-weighted per position as
    ``W``'s would be (:func:`embedding_delta`); shared with the routed embedding
    (:mod:`lora_fx.ops_route`).  Returns ``y``'s shape and dtype."""
    if padding_idx is None and not scale_grad_by_freq:
        return y + _to(rows @ a, y)
    # the value is rows @ a; A's gradient is re-weighted per position (w_i of embedding_delta)
    w = torch.ones(indices.shape, dtype=a.dtype, device=a.device)
    if scale_grad_by_freq:
        flat = indices.reshape(-1)
        counts = torch.zeros(num_embeddings, dtype=a.dtype, device=a.device).index_add_(
            0, flat, torch.ones_like(flat, dtype=a.dtype))  # static shape (compile-friendly)
        w = w / counts[flat].reshape(indices.shape)
    if padding_idx is not None:
        pad = padding_idx + num_embeddings if padding_idx < 0 else padding_idx
        w = w.masked_fill(indices == pad, 0.0)
    u = rows.detach() @ a
    return y + _to(rows @ a.detach() + (u - u.detach()) * w.unsqueeze(-1), y)


_CONV: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@delta_op
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


@graph_op
def module_call(module: torch.nn.Module, overrides: dict[str, Tensor], *args, **kwargs):
    """Call ``module(*args, **kwargs)`` with some parameters replaced (merge lowering of an opaque
    leaf module).  Mirrors :func:`torch.func.functional_call`; the module is not modified."""
    # a plain dict: fx hands node arguments over as immutable dicts, which torch.export's
    # functional_call tracing tries to update
    return torch.func.functional_call(module, dict(overrides), args, kwargs, strict=False, tie_weights=False)


graph_op(recompute_point)  # the producer of recomputable adapter inputs (lora_fx.recompute)
graph_op(act_mul)  # gated activations that keep act's input (lora_fx.act_mul)


@merge_op
def dequantized(weight: Tensor) -> Tensor:
    """``W`` as the floating tensor of its logical shape (:func:`lora_fx.weights.dequantize`): the
    first link of the merge chain of a weight whose kind is not a plain tensor (a quantized
    weight, say), so :func:`merge` reads a float ``W``.  Plain weights never pass through it."""
    return weights.dequantize(weight)
