"""Gated activations that keep the activation's input, not its output: ``act(g) * u``.

A gated MLP (Llama, Mistral, Qwen2, Gemma: ``down_proj(act(gate_proj(x)) * up_proj(x))``) makes
autograd keep three activation-sized tensors for ``act(g) * u``: ``g`` (for the activation's
backward), ``act(g)`` (for ``∂/∂u``) and ``u`` (for ``∂/∂act(g)``).  :func:`act_mul` keeps ``g``
and ``u`` only and recomputes ``act(g)`` in backward: one intermediate-sized tensor less per gated
MLP, with the same forward value and the same gradients bit for bit (backward runs the ops
autograd runs, ``grad * u``, ``grad * act(g)`` and ATen's ``silu_backward`` / ``gelu_backward``,
on the bit-identical recomputed ``act(g)``).  Fused SwiGLU kernels (Liger-Kernel, Unsloth) save the
same two tensors.

The graph pass :mod:`lora_fx.passes.match_act_mul` rewrites ``mul(silu(g), u)`` (and ``gelu``,
either operand order, function and ATen forms) into ``act_mul(g, u, act=...)`` where the
activation's output has no other user and nothing between the activation and the product reads
``g`` (an in-place write would change what ``act(g)`` reads; another reader would change the order
in which autograd sums ``g``'s gradient, whose one backward node now sits at the product).  When a
site recomputes the product for its own backward (``down_proj``'s adapter input,
:func:`recompute_product`), it hands ``act(g)`` to the product's backward, so backward computes it
once.  :func:`act_mul` is the plain expression under
``torch.compile`` (Inductor's partitioner recomputes pointwise ops itself), without grad, when
``g`` needs no gradient, under ``torch.func`` transforms and forward-mode AD, and when ``g`` and
``u`` differ in shape or dtype (broadcasting, type promotion) or are tensor subclasses.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

__all__ = ["act_mul", "recompute_product", "ACTIVATIONS", "applies"]

_aten = torch.ops.aten

#: ``act -> (forward(g, approximate), backward(grad, g, approximate))``: the activation and the ATen
#: backward autograd itself runs for it (``SiluBackward0`` / ``GeluBackward0``)
ACTIVATIONS = {
    "silu": (lambda g, approximate: F.silu(g), lambda grad, g, approximate: _aten.silu_backward(grad, g)),
    "gelu": (lambda g, approximate: F.gelu(g, approximate=approximate),
             lambda grad, g, approximate: _aten.gelu_backward(grad, g, approximate=approximate)),
}


def applies(g, u) -> bool:
    """Whether :func:`act_mul` takes its memory-saving form for these operands now (same shape and
    dtype, plain tensors, eager autograd recording, ``g`` needing a gradient: without one the plain
    expression keeps ``act(g)`` alone, one tensor); otherwise it is the plain expression."""
    return (not torch.compiler.is_compiling() and type(g) is Tensor and type(u) is Tensor and g.shape == u.shape
            and g.dtype == u.dtype and torch.is_grad_enabled() and g.requires_grad
            and not torch._C._are_functorch_transforms_active() and _forward_ad._current_level < 0)


class _ActMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, u, act, approximate):
        ctx.act, ctx.approximate = act, approximate
        dev = g.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(g, u)
        return ACTIVATIONS[act][0](g, approximate) * u

    @staticmethod
    def backward(ctx, grad):
        g, u = ctx.saved_tensors
        forward, backward = ACTIVATIONS[ctx.act]
        dev, enabled, dtype = ctx.autocast
        gg = gu = a = None
        handed = getattr(ctx, "recomputed", None)  # act(g) a site's backward recomputed (recompute_product)
        if handed is not None:
            del ctx.recomputed
        if handed is not None and handed[0] is g and handed[1] == ctx.autocast and not torch.is_grad_enabled():
            a = handed[2]
        elif torch.is_grad_enabled() or ctx.needs_input_grad[1]:
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                a = forward(g, ctx.approximate)
        if ctx.needs_input_grad[0]:  # MulBackward0's grad * other, then the activation's backward
            if torch.is_grad_enabled():  # create_graph=True: the ATen backwards have no derivative
                gg, = torch.autograd.grad(a, g, grad * u, create_graph=True)
            else:
                gg = backward(grad * u, g, ctx.approximate)
        if ctx.needs_input_grad[1]:
            gu = grad * a
        return gg, gu, None, None


def recompute_product(g: Tensor, u: Tensor, act: str = "silu", approximate: str = "none", *,
                      producer=None) -> Tensor:
    """``act(g) * u`` recomputed in backward by a site that reads the product (``down_proj``'s
    adapter input, :mod:`lora_fx.recompute`): ``producer``, the product's ``grad_fn``, gets the
    recomputed ``act(g)`` for its own backward, which then does not compute it again (outside
    ``create_graph``, under the autocast state it recorded).  Same values as the plain expression.

    Args:
        g, u: the product's saved operands, same shape and dtype; act, approximate: as :func:`act_mul`.
        producer: the product's ``grad_fn`` (an ``act_mul`` backward node), or anything else (ignored).

    Returns:
        ``act(g) * u``, ``g``'s shape and dtype.
    """
    a = ACTIVATIONS[act][0](g, approximate)
    if isinstance(producer, _ActMul._backward_cls) and not torch.is_grad_enabled():
        dev = g.device.type
        producer.recomputed = (g, (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)), a)
    return a * u


def act_mul(g: Tensor, u: Tensor, act: str = "silu", approximate: str = "none") -> Tensor:
    """``act(g) * u``, keeping ``g`` and ``u`` for backward instead of ``act(g)`` and ``u``: the gated
    linear unit of SwiGLU / GeGLU MLPs (Shazeer, "GLU Variants Improve Transformer", 2020, eq. 6),
    ``act`` as ``torch.nn.functional.silu`` / ``gelu`` define it.

    Args:
        g: the activation's input (``gate_proj``'s output), any shape and floating dtype.
        u: the other factor (``up_proj``'s output), same shape and dtype for the saving form.
        act: ``"silu"`` (``F.silu``) or ``"gelu"`` (``F.gelu``).
        approximate: ``F.gelu``'s ``approximate`` (``"none"`` | ``"tanh"``); ignored for silu.

    Returns:
        ``act(g) * u``, equal bit for bit to the plain expression, with the same gradients.

    Raises:
        ConfigError: ``act`` is not one of :data:`ACTIVATIONS`.
    """
    if act not in ACTIVATIONS:
        raise ConfigError(f"act_mul(): act={act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    if applies(g, u):
        return _ActMul.apply(g, u, act, approximate)
    return ACTIVATIONS[act][0](g, approximate) * u
