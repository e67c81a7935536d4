"""The factored linear delta in eager mode: ``y + s·(x Aᵀ) Bᵀ`` as one autograd Function.

:func:`lora_fx.ops.linear_delta` computes the delta with plain ops under ``torch.compile`` (where
Inductor picks its own kernels), under ``torch.func`` transforms and forward-mode AD, under
autocast, and for mixed dtypes, fused adapters or tensor subclasses.  Everywhere else (plain eager
training and inference) it calls :func:`linear_delta_eager`, which computes the same values with
fewer passes over memory:

* forward: ``h = (x Aᵀ)·s`` in place, then the up-projection ``y += h Bᵀ`` as one GEMM into the
  base op's output (``addmm_``, beta 1) where that output is free to overwrite (below), else one
  out-of-place ``addmm``;
* backward: ``dB = (hᵀ g)ᵀ``, ``g0 = (g B)·s``, ``dx = g0 A``, ``dA = g0ᵀ x``: the GEMM layouts that are
  fastest on CPU BLAS (``(hᵀ g)ᵀ`` rather than ``gᵀ h``), no autograd node per reshape, transpose
  or scaling, and ``x`` recomputed from its producer's inputs when the site has a ``remat`` spec
  (:mod:`lora_fx.recompute`), as :func:`lora_fx.recompute.down` does.

**Overwriting the base output.**  The pass passes ``inplace=True`` only where the graph guarantees
that the delta is the only user of ``y`` and that the base op's backward does not read its output
(:attr:`lora_fx.rules.Factored.overwrite`: stock ``nn.Linear`` / ``F.linear`` sites and deltas
chained after them).  At run time ``y`` is overwritten only if no other Python reference and no
other tensor (a view, a ``detach()``) holds it (a forward hook that kept the base output keeps its
value), and ``y`` is the whole of its storage; else the up-projection is out of place.  Autograd's
version counter still guards anything that saved ``y`` for backward.

**Second derivatives.**  With ``create_graph=True`` the backward recomputes ``h`` (and ``x``) with
autograd recording and uses out-of-place ops, so its results are differentiable again, as those of
the plain ops are.

Values: the same GEMMs as the plain ops on the same operands, so outputs and gradients agree to
rounding (a BLAS may block an in-place ``addmm_`` differently from an out-of-place one).
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

__all__ = ["ENABLED", "eligible", "linear_delta_eager"]

#: False: every linear delta runs the plain ops (for A/B measurements and bisecting; the values agree
#: to rounding either way).
ENABLED = True

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _callee(t: Tensor) -> int:  # as linear_delta_eager counts: its caller's parameter, passed on
    return sys.getrefcount(t)


def _caller(t: Tensor) -> int:  # as lora_fx.ops.linear_delta: the graph code's local, passed on
    return _callee(t)


def _calibrate():
    """Counts of a tensor that only the graph code's local variable holds, as
    :func:`linear_delta_eager` sees them on this interpreter: (Python references, storage uses
    without and with a base tensor)."""
    t = torch.empty(4)
    refs = _caller(t)
    if _use_count is None:
        return refs, None, None
    v = torch.empty(4).view(2, 2)
    return refs, _use_count(t.untyped_storage()._cdata), _use_count(v.untyped_storage()._cdata)


_REFS, _STORAGE_PLAIN, _STORAGE_VIEW = _calibrate()


def _autograd_view(y: Tensor, base: Tensor) -> bool:
    """Whether autograd records ``y`` as a plain view of ``base`` (``F.linear`` with a bias on a 3-D
    input: a ``view`` of its ``addmm``), so that the gradient of what is written into ``base`` flows
    through ``y``'s own history."""
    fn = y.grad_fn
    return (fn is not None and base.grad_fn is not None and type(fn).__name__ == "ViewBackward0"
            and fn.next_functions[0][0] is base.grad_fn)


def _sole_owner(y: Tensor, refs: int) -> Tensor | None:
    """The tensor the up-projection may accumulate into: ``y``, or the base of which ``y`` is a
    full contiguous view; None when anything else may read ``y``'s memory (``refs``: ``y``'s
    reference count as :func:`linear_delta_eager` saw it)."""
    if _use_count is None or refs != _REFS or not y.is_contiguous():
        return None
    base = y._base
    if base is None:
        target, expected = y, _STORAGE_PLAIN
    else:
        if base._base is not None or not base.is_contiguous() or base.numel() != y.numel():
            return None
        if y.requires_grad and not _autograd_view(y, base):
            return None  # y's history is not base's (a custom Function's output that views a tensor of its own)
        target, expected = base, _STORAGE_VIEW
    if target.storage_offset() != 0 or target.untyped_storage().nbytes() != target.numel() * target.element_size():
        return None
    return target if _use_count(target.untyped_storage()._cdata) == expected else None


class _LinearDelta(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, lora_A, lora_B, scaling, overwrite, producer, kwargs, *inputs):
        out_features = y.shape[-1]
        x2 = x.reshape(-1, x.shape[-1])
        h = torch.mm(x2, lora_A.t())
        h.mul_(scaling)
        if overwrite:
            y.view(-1, out_features).addmm_(h, lora_B.t())
            ctx.mark_dirty(y)
            out = y
        else:
            out = torch.addmm(y.reshape(-1, out_features), h, lora_B.t()).view(y.shape)
        ctx.producer, ctx.kwargs, ctx.x_shape = producer, kwargs, x.shape
        ctx.none = [t is None for t in inputs]
        if producer is None:
            ctx.save_for_backward(lora_A, lora_B, scaling, h, x)
        else:  # x is recomputed from its producer's inputs (already kept by the producer's backward)
            ctx.save_for_backward(lora_A, lora_B, scaling, h, *[t for t in inputs if t is not None])
        return out

    @staticmethod
    def backward(ctx, g):
        lora_A, lora_B, scaling, h, *rest = ctx.saved_tensors
        need_x, need_A, need_B = ctx.needs_input_grad[1:4]
        differentiable = torch.is_grad_enabled()  # create_graph=True: second derivatives must see x, A, B
        dev = g.device.type
        with torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else contextlib.nullcontext():
            # the forward ran without autocast: a backward called inside an autocast region must not cast
            g2 = g.reshape(-1, g.shape[-1])
            x2 = None
            if need_A or differentiable:
                if ctx.producer is None:
                    x = rest[0]
                else:
                    it = iter(rest)
                    x = ctx.producer(*[None if n else next(it) for n in ctx.none], **ctx.kwargs)
                x2 = x.reshape(-1, ctx.x_shape[-1])
            if differentiable:
                h = torch.mm(x2, lora_A.t()) * scaling
            gx = ga = gb = None
            if need_B:
                gb = torch.mm(h.t(), g2).t()  # (hᵀ g)ᵀ: faster than gᵀ h on CPU BLAS
            if need_x or need_A:
                g0 = torch.mm(g2, lora_B)
                g0 = g0 * scaling if differentiable else g0.mul_(scaling)
                if need_x:
                    gx = torch.mm(g0, lora_A).view(ctx.x_shape)
                if need_A:
                    ga = torch.mm(g0.t(), x2)
        return (g, gx, ga, gb, None, None, None, None) + (None,) * len(ctx.none)


def eligible(y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor) -> bool:
    """Whether :func:`linear_delta_eager` may compute this delta: eager (not compiling, no
    ``torch.func`` transform, no forward AD, no autocast), one floating dtype and device, plain
    tensors (no subclass), matching leading dimensions."""
    dtype = y.dtype
    return (ENABLED and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and _forward_ad._current_level < 0 and dtype.is_floating_point
            and x.dtype == lora_A.dtype == lora_B.dtype == dtype and y.dim() >= 1 and x.dim() >= 1
            and y.shape[:-1] == x.shape[:-1] and y.device == x.device
            and not (torch.amp.is_autocast_available(y.device.type) and torch.is_autocast_enabled(y.device.type))
            and all(type(t) in _PLAIN for t in (y, x, lora_A, lora_B, scaling)))


def linear_delta_eager(y: Tensor, x: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: Tensor,
                       remat: tuple | None = None, inplace: bool = False) -> Tensor:
    """``y + s·(x Aᵀ) Bᵀ`` (see the module docstring) where :func:`eligible` holds.

    Args:
        y: ``(..., out)``, the base op's output; x: ``(..., in)``; lora_A: ``(r, in)``; lora_B:
            ``(out, r)``; scaling: 0-dim.  ``y``, ``x`` and the factors share one floating dtype.
        remat: ``(producer, inputs, kwargs)`` with ``x == producer(*inputs, **kwargs)``, whose
            inputs are kept instead of ``x`` (:func:`lora_fx.recompute.down`'s checks passed), or None.
        inplace: the graph guarantees ``y`` is otherwise dead (see the module docstring).  Call
            this function with ``y`` straight from the graph code (through one function, as
            :func:`lora_fx.ops.linear_delta` does): its reference count is what says that nothing
            else holds ``y``.

    Returns:
        ``(..., out)`` in ``y``'s dtype (``y`` itself, or a view of its storage, when overwritten).
    """
    refs = sys.getrefcount(y)  # before anything else holds y (an argument list being built would)
    target = _sole_owner(y, refs) if inplace else None
    if not torch.is_grad_enabled():
        h = torch.mm(x.reshape(-1, x.shape[-1]), lora_A.t()).mul_(scaling)
        if target is None:
            return torch.addmm(y.reshape(-1, y.shape[-1]), h, lora_B.t()).view(y.shape)
        target.view(-1, y.shape[-1]).addmm_(h, lora_B.t())
        return y
    producer, inputs, kwargs = (None, (), None) if remat is None else remat
    if target is None:
        return _LinearDelta.apply(y, x, lora_A, lora_B, scaling, False, producer, kwargs, *inputs)
    out = _LinearDelta.apply(target, x, lora_A, lora_B, scaling, True, producer, kwargs, *inputs)
    return out if target is y else out.view(y.shape)
