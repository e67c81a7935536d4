"""A factored linear site computed on the merged weight: one GEMM forward, one backward.

A factored site ``F.linear(x, W, b) + s·(x Aᵀ) Bᵀ`` runs three GEMMs whose output has the full
``(..., out)`` or ``(..., in)`` size per direction: the base product, the up-projection
``(x Aᵀ) Bᵀ`` forward, and ``(g B) A`` backward (the adapter's part of ``∂L/∂x``), plus the sums
that join them.  When the tokens outnumber the weight (``M·(in + out) ≥ 2·in·out`` for ``M`` rows of
``x``), :func:`linear_site` computes instead::

    W' = W + s·B @ A                          # (out, in), forward and again in backward
    y  = F.linear(x, W', b)                   # the value (Hu et al., 2022, eq. 3, read as written)
    ∂L/∂x = g W'                              # one GEMM for the base and adapter parts
    ∂L/∂B = gᵀ (s·x Aᵀ),  ∂L/∂A = (s·g B)ᵀ x   # the factored gradients: no (out, in) weight gradient

so the up-projections and their sums are gone, the ``(out, in)`` gradient of ``W'`` that autograd
would form on a merged weight is never made, and autograd keeps what the factored form keeps
(``x``, or nothing where the site recomputes ``x`` from its producer, and ``s·x Aᵀ``).  The
values are those of the merged lowering (``F.linear(x, W + ΔW, b)``, what the functional
reference computes); gradients are the same functions, summed in another order.

It is the factored expression itself (:func:`lora_fx.ops.linear_delta` on the base op) whenever
the merged form would not be exact or cheaper: without grad, when the adapter needs no gradient
or ``W``, ``b`` or ``scaling`` need one, under autocast, for dtypes other than float32 / float64
(a ``W + ΔW`` rounded to bfloat16 would lose the small early delta), for tensor subclasses
(quantized or sharded weights), when the layer module has hooks or is not an ``nn.Linear``, under
``torch.func`` transforms and forward-mode AD, under ``torch.compile`` and ``torch.export`` and in
TorchScript tracing.  Compiled, AOTAutograd's partitioner never recomputes a matrix product, so a
merged weight shared by forward and backward is saved (one ``(out, in)`` tensor per site), and one
rebuilt in backward costs what the merge saves (docs/benchmarks.md, compiled speed); the factored
form, whose sums Inductor fuses, is as fast and keeps the compiled recomputation of inputs.

Adapted graphs hold the factored chain; :mod:`lora_fx.passes.match_linear_site` rewrites the code a
graph module runs (not its graph) so that a site's base op and its first adapter are one call.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import graph_op, linear_delta
from .recompute import _autocast_on, as_rows, _global_hooks, _recomputable, keep_producer, recomputed_input

__all__ = ["linear_site", "merged_applies"]

_PLAIN = (Tensor, nn.Parameter)
_STOCK_FILE = torch.nn.modules.linear.__file__
_stock_seen: list = []  # the nn.Linear.forward last found to be PyTorch's own


def _stock_linear_forward() -> bool:
    """Whether ``nn.Linear.forward`` is PyTorch's own (its code in ``torch/nn/modules/linear.py``):
    a patch made before lora_fx was imported is seen too."""
    f = nn.Linear.forward
    if _stock_seen and _stock_seen[0] is f:
        return True
    code = getattr(f, "__code__", None)
    if code is None or code.co_filename != _STOCK_FILE or code.co_name != "forward":
        return False
    _stock_seen[:] = [f]
    return True
_DTYPES = (torch.float32, torch.float64)

#: the base layer of a site: an ``nn.Linear`` module the graph called, or ``(weight, bias)``
Layer = Union[nn.Module, tuple]


def _plain(t) -> bool:
    return t is None or type(t) in _PLAIN


def merged_applies(x: Tensor, weight: Tensor, bias, lora_A: Tensor, lora_B: Tensor, scaling: Tensor) -> bool:
    """Whether :func:`linear_site` takes its merged form for these tensors now (see the module
    docstring): recording eager or compiled autograd, adapter needing a gradient, frozen plain
    float32 / float64 tensors of one dtype, no autocast, and enough rows ``M`` of ``x`` that the
    merged weight costs less than the up-projections (``M·(in + out) ≥ 2·in·out``)."""
    # both factors trainable: with A frozen the factored form keeps no x, this one would
    if not (torch.is_grad_enabled() and lora_A.requires_grad and lora_B.requires_grad):
        return False
    if weight.requires_grad or scaling.requires_grad or (bias is not None and bias.requires_grad):
        return False
    if not (_plain(x) and _plain(weight) and _plain(bias) and _plain(lora_A) and _plain(lora_B)):
        return False
    dtype = weight.dtype
    if (dtype not in _DTYPES or x.dtype != dtype or lora_A.dtype != dtype or lora_B.dtype != dtype
            or (bias is not None and bias.dtype != dtype) or scaling.dim() != 0):
        return False
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1] or lora_A.dim() != 2 or lora_B.dim() != 2:
        return False
    if lora_A.shape[1] != weight.shape[1] or lora_B.shape[0] != weight.shape[0] or lora_A.shape[0] != lora_B.shape[1]:
        return False
    # compiled: the partitioner saves the merged weight (a matrix product: 239 instead of 168 MiB on
    # the benchmark GPT) or, rebuilt in backward, it costs what it saved; compiled code is factored
    if (_autocast_on(x.device.type) or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()):
        return False
    if torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0:
        return False
    out_f, in_f = weight.shape
    if not (in_f and out_f and lora_A.shape[0]):
        return False
    rows = x.numel() // in_f
    return rows * (in_f + out_f) >= 2 * in_f * out_f


class _MergedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, kind, kwargs, *inputs):
        a = lora_A * scaling
        h = F.linear(x, a)  # (..., r) = s·x Aᵀ: what ∂L/∂B reads
        y = F.linear(x, torch.addmm(weight, lora_B, a), bias)
        ctx.recomputes = kind is not None
        # x is kept unless the site recomputes it from its producer's inputs
        kept = keep_producer(ctx, x, kind, kwargs, inputs) if ctx.recomputes else [x]
        # W is read only for ∂L/∂x: not kept (nor checked for in-place writes) when x needs none
        ctx.save_for_backward(weight if ctx.needs_input_grad[0] else None, lora_A, lora_B, scaling, h, *kept)
        return y

    @staticmethod
    def backward(ctx, g):
        weight, lora_A, lora_B, scaling, h, *kept = ctx.saved_tensors
        x = recomputed_input(ctx, kept) if ctx.recomputes else kept[0]
        a = lora_A * scaling
        if torch.is_grad_enabled():  # create_graph=True: every term from the inputs
            h = F.linear(x, a)
        g2 = as_rows(g)
        gx = ga = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ torch.addmm(weight, lora_B, a)
        if ctx.needs_input_grad[3]:
            gs = g2 @ (lora_B * scaling)  # (M, r) = s·g B
            ga = gs.t() @ as_rows(x)
        if ctx.needs_input_grad[4]:
            gb = g2.t() @ as_rows(h)
        # W, b and scaling are frozen (merged_applies): no gradient for them
        return (gx, None, None, ga, gb, None, None, None) + (None,) * len(ctx.none if ctx.recomputes else ())


def _layer_parts(layer: Layer):
    """``(weight, bias, module)`` of a site's base layer (``module`` None for ``(weight, bias)``)."""
    if isinstance(layer, nn.Module):
        return layer.weight, layer.bias, layer
    weight, bias = layer
    return weight, bias, None


def _hooked(m: nn.Module) -> bool:
    """Whether calling ``m`` does more than ``F.linear``: not an ``nn.Linear``, a ``forward`` set on the
    instance (accelerate's hooks) or a patched class forward, forward or backward hooks (own or global)."""
    mm = torch.nn.modules.module
    return (type(m) is not nn.Linear or "forward" in m.__dict__ or not _stock_linear_forward()
            or bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
            or _global_hooks() or bool(mm._global_backward_hooks or mm._global_backward_pre_hooks))


@graph_op
def linear_site(layer: Layer, x: Tensor, x_in: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor,
                remat: tuple | None = None) -> Tensor:
    """``F.linear(x, W, b)`` with one adapter: ``x (W + s·B A)ᵀ + b`` (Hu et al., 2022, eq. 3).

    Args:
        layer: the base op, an ``nn.Linear`` module (called as it is when it has hooks or is no longer
            an ``nn.Linear``) or a ``(weight, bias)`` pair; ``W: (out, in)``, ``b: (out,)`` or None.
        x: ``(..., in)``, the base op's input.
        x_in: the adapter's input, equal in value to ``x`` (the second output of a
            :func:`~lora_fx.recompute.recompute_point`, or ``x`` itself); the merged form needs
            ``x_in is x``, any other tensor takes the factored form.
        lora_A: ``(rank, in)``; lora_B: ``(out, rank)``; scaling: 0-dim tensor.
        remat: how to recompute ``x_in`` in backward instead of keeping it
            (:func:`lora_fx.recompute.down`).

    Returns:
        ``(..., out)`` in ``W``'s dtype: the merged form (module docstring) where
        :func:`merged_applies`, else exactly ``linear_delta(F.linear(x, W, b), x_in, ...)``.
    """
    weight, bias, module = _layer_parts(layer)
    # x_in is x in every eager graph (a recompute point's two outputs are one tensor); a distinct
    # x_in takes the factored form, which gives each of the two its own gradient
    if (x_in is not x or not merged_applies(x, weight, bias, lora_A, lora_B, scaling)
            or (module is not None and _hooked(module))):
        y = module(x) if module is not None else F.linear(x, weight, bias)
        return linear_delta(y, x_in, lora_A, lora_B, scaling, remat=remat)
    spec = _recomputable(x, lora_A, remat)
    if spec is None:
        return _MergedLinear.apply(x, weight, bias, lora_A, lora_B, scaling, None, None)
    kind, inputs, kwargs = spec
    return _MergedLinear.apply(x, weight, bias, lora_A, lora_B, scaling, kind, kwargs, *inputs)
