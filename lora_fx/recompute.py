"""Adapter-input rematerialisation: the LoRA down-projection without keeping its input alive.

A factored site computes ``h = s·x Aᵀ`` and autograd keeps ``x`` for ``∂L/∂A = s·gᵀx``.  When
``x`` is the output of a cheap op whose own backward already keeps that op's inputs (``gelu(u)``,
``silu(u)``, ``layer_norm(u, w, b)``, ``rms_norm(u, w)``, ``a * b`` of two tensors that both
require grad), nothing but the adapter holds ``x`` between forward and backward: PEFT-style
layers pay one activation-sized tensor per adapted site for it.  :func:`down` instead saves the
producer's inputs (shared storage, already saved) and recomputes ``x`` in backward, under the
forward's autocast state.  The result and gradients are those of ``F.linear(x, A) * s`` (the
same GEMMs on bit-identical recomputed values).

:func:`down` is used by eager autograd only: under ``torch.compile``, under ``torch.func`` transforms or
forward-mode AD, in ``no_grad``, when nothing needs a gradient, or when ``x`` was modified in place
after its producer made it, it is the plain expression.  The pass (:mod:`lora_fx.passes.insert_lora`)
attaches a ``remat`` spec ``(kind, inputs, kwargs)`` to a site only where the producer node is one
of :data:`PRODUCERS`.

Under ``torch.compile`` the producer node itself is the recompute point: the pass rewrites it to
:func:`recompute_point`, a plain call in eager that, when Dynamo traces it with grad enabled, runs
the producer under ``torch.utils.checkpoint``.  Its nodes then carry the checkpoint's recompute
tags, and AOTAutograd's min-cut partitioner recomputes ``x`` in backward from the producer's inputs
instead of saving it (the partitioner recomputes graph nodes, so the values are those of the
compiled forward, in-place changes after the producer included), and the low-precision cast of
``x`` that autocast's ``F.linear`` makes as well.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
import torch.utils.checkpoint as _checkpoint
from torch import Tensor, nn

from . import act_mul as _act_mul
from .producers import recompute_tagged, tag_spec

__all__ = ["down", "recompute_point", "PRODUCERS", "POINT_TARGETS", "module_kind"]

#: producer kinds whose backward keeps every tensor input that requires grad: recomputing their
#: output from those inputs costs no memory.  ``kind -> function(*inputs, **kwargs)``.
PRODUCERS = {
    "gelu": lambda u, approximate="none": F.gelu(u, approximate=approximate),
    "silu": lambda u: F.silu(u),
    "layer_norm": lambda u, w, b, normalized_shape, eps: F.layer_norm(u, normalized_shape, w, b, eps),
    "rms_norm": lambda u, w, normalized_shape, eps: F.rms_norm(u, normalized_shape, w, eps),
    "mul": lambda a, b: torch.mul(a, b),
    # a gated activation act(g) * u (lora_fx.act_mul), which keeps g and u for its own backward
    "act_mul": _act_mul.recompute_product,
    # a norm module called by the model's own Python (lora_fx.producers): its forward on u again
    # (``shape``: the site read a view of the norm's whole output, e.g. Conv1D's ``x.view(-1, d)``)
    "tagged": lambda u, tag, shape=None: recompute_tagged(u, tag, shape),
}


#: producer kinds whose recompute hands what it computed to the producer's own backward node
#: (``PRODUCERS[kind](..., producer=x.grad_fn)``)
_HANDS_BACK = frozenset({"act_mul"})

_aten = torch.ops.aten

#: call targets a :func:`recompute_point` may stand for, by the name its graph node spells (fx code
#: cannot spell a function as an argument): ``name -> (producer kind, callable)``.
POINT_TARGETS = {
    "F.gelu": ("gelu", F.gelu),
    "torch._C._nn.gelu": ("gelu", torch._C._nn.gelu),
    "aten.gelu": ("gelu", _aten.gelu.default),
    "F.silu": ("silu", F.silu),
    "torch._C._nn.silu": ("silu", torch._C._nn.silu),
    "aten.silu": ("silu", _aten.silu.default),
    "F.layer_norm": ("layer_norm", F.layer_norm),
    "aten.layer_norm": ("layer_norm", _aten.layer_norm.default),
    "F.rms_norm": ("rms_norm", F.rms_norm),
    "operator.mul": ("mul", operator.mul),
    "torch.mul": ("mul", torch.mul),
    "aten.mul": ("mul", _aten.mul.Tensor),
    "lora_fx.act_mul": ("act_mul", _act_mul.act_mul),
}


def module_kind(m: nn.Module) -> str | None:
    """Producer kind of a stock leaf module (exact types, no subclasses), or None."""
    t = type(m)
    if t is nn.GELU:
        return "gelu"
    if t is nn.SiLU and not m.inplace:
        return "silu"
    if t is nn.LayerNorm:
        return "layer_norm"
    if t is getattr(nn, "RMSNorm", None):
        return "rms_norm"
    return None


def _global_hooks() -> bool:
    mm = torch.nn.modules.module
    return any(getattr(mm, h, None) for h in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                               "_global_forward_hooks_always_called"))


def _module_inputs(kind: str, m: nn.Module, u):
    """``(inputs, kwargs)`` recomputing leaf ``m``'s output from ``u`` as ``m`` stands now; None when
    ``m`` is no longer a hook-free stock module of ``kind``."""
    if module_kind(m) != kind or m._forward_hooks or m._forward_pre_hooks or _global_hooks():
        return None
    if kind == "gelu":
        return (u,), {"approximate": m.approximate}
    if kind == "silu":
        return (u,), {}
    if kind == "layer_norm":
        return (u, m.weight, m.bias), {"normalized_shape": tuple(m.normalized_shape), "eps": m.eps}
    return (u, m.weight), {"normalized_shape": tuple(m.normalized_shape), "eps": m.eps}


def _to(x: Tensor, like: Tensor) -> Tensor:
    """``x`` in ``like``'s dtype (no copy when it already is); shared with :mod:`lora_fx.ops`."""
    return x if x.dtype == like.dtype else x.to(like.dtype)


def as_rows(t: Tensor) -> Tensor:
    """``t (..., n)`` as a ``(prod(...), n)`` matrix (also where ``n`` is 0, which ``reshape(-1, n)``
    cannot infer); shared with :mod:`lora_fx.ops` and :mod:`lora_fx.linear_site`."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _linear_input(x: Tensor, lora_A: Tensor) -> Tensor:
    """``x`` as ``F.linear(·, lora_A)`` reads it: in ``lora_A``'s dtype, or as it is under autocast
    (which casts both operands itself: a cast to ``lora_A``'s dtype first would change no value,
    and under ``torch.compile`` it would hide the cast that :func:`recompute_point` makes)."""
    if x.dtype != torch.float64 and _autocast_on(x.device.type):  # autocast leaves float64 alone
        return x
    return _to(x, lora_A)


def _free_to_keep(kind: str, inputs: tuple) -> bool:
    """Whether keeping ``inputs`` alive until backward costs nothing extra: each is a parameter
    or buffer-like leaf (alive anyway) or is saved by the producer's own backward."""
    tensors = [t for t in inputs if isinstance(t, Tensor)]
    if kind == "mul":  # a*b keeps b iff a needs a grad, and a iff b does
        if len(tensors) != 2:
            return False
        a, b = tensors
        return (b.requires_grad or isinstance(a, nn.Parameter)) and (a.requires_grad or isinstance(b, nn.Parameter))
    if kind == "act_mul":  # both forms (lora_fx.act_mul) keep g and u whenever g needs a grad
        return len(tensors) == 2 and len(inputs) == 2 and inputs[0].requires_grad
    # unary producers keep their first input whenever it needs a grad.  One that needs none is saved
    # by nobody: no version counter check guards it, so an in-place change of it (between the
    # producer and the site, or before backward) would silently change the recomputed x, or make
    # backward raise where keeping x works.  Keeping x instead costs the same memory.
    return bool(tensors) and tensors[0] is inputs[0] and tensors[0].requires_grad


def producer_kwargs(kind: str, kwargs: dict, x: Tensor) -> dict:
    """``kwargs`` of ``PRODUCERS[kind]`` recomputing ``x`` in backward: with ``producer=x.grad_fn``
    for a kind that hands what it recomputed to the producer's own backward node."""
    return dict(kwargs, producer=x.grad_fn) if kind in _HANDS_BACK else kwargs


def keep_producer(ctx, x: Tensor, kind: str, kwargs: dict, inputs: tuple) -> list[Tensor]:
    """Record on an autograd Function's ``ctx`` how to recompute ``x = PRODUCERS[kind](*inputs,
    **kwargs)`` in backward (:func:`recomputed_input`), under the current autocast state; returns the
    tensors to save (``inputs`` without the ``None`` s)."""
    dev = x.device.type
    ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
    # a producer whose own backward node takes the recomputed value (computed once: act_mul's act(g))
    ctx.kind, ctx.kwargs = kind, producer_kwargs(kind, kwargs, x)
    ctx.none = [t is None for t in inputs]
    return [t for t in inputs if t is not None]


def recomputed_input(ctx, saved) -> Tensor:
    """``x`` recomputed from the tensors :func:`keep_producer` had saved, under the forward's autocast
    state.  With ``create_graph=True`` (grad mode on in backward) it is recomputed differentiably, so
    second derivatives see ``x`` as the function of the inputs that it is."""
    it = iter(saved)
    inputs = [None if none else next(it) for none in ctx.none]
    dev, enabled, dtype = ctx.autocast
    with torch.autocast(dev, dtype=dtype, enabled=enabled):
        return PRODUCERS[ctx.kind](*inputs, **ctx.kwargs)


class _RematDown(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lora_A, scaling, kind, kwargs, *inputs):
        h = F.linear(_linear_input(x, lora_A), lora_A) * scaling
        ctx.x_dtype, ctx.compute_dtype = x.dtype, h.dtype
        ctx.save_for_backward(lora_A, scaling, *keep_producer(ctx, x, kind, kwargs, inputs))
        return h

    @staticmethod
    def backward(ctx, g):
        lora_A, scaling, *saved = ctx.saved_tensors
        x = recomputed_input(ctx, saved)
        cd = ctx.compute_dtype
        g0 = g * scaling  # as MulBackward: dtype of h
        a = lora_A if lora_A.dtype == cd else lora_A.to(cd)
        gx = ga = None
        if ctx.needs_input_grad[0]:
            gx = (g0 @ a).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            xc = x if x.dtype == cd else x.to(cd)
            g2, x2 = as_rows(g0), as_rows(xc)
            # the product autograd's mm backward forms for F.linear(x, A) (column-major Aᵀ: gᵀx; else
            # (xᵀg)ᵀ), so the gradient is the one without recomputation bit for bit on every CPU kernel
            column_major = lora_A.stride(-1) == 1 and lora_A.stride(0) == lora_A.shape[-1]
            ga = (g2.t() @ x2 if column_major else (x2.t() @ g2).t()).to(lora_A.dtype)
        return (gx, ga, None, None, None) + (None,) * len(ctx.none)


def _recomputable(x: Tensor, lora_A: Tensor, remat: tuple | None) -> tuple | None:
    """``(kind, inputs, kwargs)`` to recompute ``x`` from in backward, or None for the plain form."""
    # torch.func transforms (grad, vmap, jacrev: per-sample gradients) refuse an autograd.Function
    # without setup_context/vmap rules, and forward-mode AD one without jvp: those run the plain expression
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or not (x.requires_grad or lora_A.requires_grad) or torch._C._are_functorch_transforms_active()
            or _forward_ad._current_level >= 0):
        return None
    if remat is None:  # no producer in the graph: one tagged by the model's own code, if any
        return tag_spec(x)
    kind, inputs, kwargs = remat
    if "module" in kwargs:  # a leaf module producer: its weights and attributes as they are now
        found = _module_inputs(kind, kwargs["module"], inputs[0])
        if found is None:
            return None
        inputs, kwargs = found
    # x._version != 0: x was modified in place after its producer made it (``h = gelu(u);
    # h.relu_(); fc(h)``, where the graph still feeds the gelu node): recomputing would miss that
    # not x.requires_grad: the producer recorded nothing (no grad needed, or it ran under no_grad),
    # so keeping its inputs is neither free nor guarded by autograd's version checks
    if x._version != 0 or not x.requires_grad or not _free_to_keep(kind, inputs):
        return None
    return kind, inputs, kwargs


def down(x: Tensor, lora_A: Tensor, scaling: Tensor, remat: tuple | None = None) -> Tensor:
    """``h = s·x Aᵀ``: the down-projection of a factored linear site.

    Args:
        x: ``(..., fan_in)``, the adapter input.
        lora_A: ``(rank, fan_in)``; scaling: 0-dim.
        remat: ``(kind, inputs, kwargs)`` with ``x == PRODUCERS[kind](*inputs, **kwargs)``, or
            ``(kind, (u,), {"module": leaf})`` for a stock leaf module (``x == leaf(u)``), or None.

    Returns:
        ``(..., rank)`` in the dtype ``F.linear`` gives (``lora_A``'s, or autocast's).
    """
    spec = _recomputable(x, lora_A, remat)
    if spec is None:
        return F.linear(_linear_input(x, lora_A), lora_A) * scaling
    kind, inputs, kwargs = spec
    return _RematDown.apply(x, lora_A, scaling, kind, dict(kwargs), *inputs)


def _point_is_free(target, args: tuple, kwargs: dict) -> bool:
    """Whether recomputing this producer's output in backward keeps nothing alive that would not be
    alive anyway (:func:`_free_to_keep`, read from the call as it runs; static facts for Dynamo)."""
    if isinstance(target, nn.Module):
        kind = module_kind(target)
        if (kind is None or target._forward_hooks or target._forward_pre_hooks or _global_hooks()
                or len(args) != 1 or kwargs):
            return False  # a hooked or swapped leaf runs as called, once
        return isinstance(args[0], Tensor) and args[0].requires_grad
    kind = POINT_TARGETS[target][0]
    if kind == "mul":
        return len(args) == 2 and not kwargs and _free_to_keep("mul", args)
    if kind == "act_mul":  # compiled, act_mul is the plain act(g) * u: it keeps g and u iff g needs a grad
        return len(args) == 2 and all(isinstance(a, Tensor) for a in args) and args[0].requires_grad
    u = args[0] if args else kwargs.get("input")
    return isinstance(u, Tensor) and u.requires_grad


def _autocast_dtype(x: Tensor):
    """The dtype autocast's ``F.linear`` casts ``x`` to, or None where it reads ``x`` as it is."""
    dev = x.device.type
    if not _autocast_on(dev) or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    dtype = torch.get_autocast_dtype(dev)
    return None if x.dtype == dtype else dtype


def _with_input(fn):
    """``fn`` returning ``(x,)``, or ``(x, x cast as autocast's F.linear casts it)``."""
    def call(*args, **kwargs):
        x = fn(*args, **kwargs)
        dtype = _autocast_dtype(x)
        return (x,) if dtype is None else (x, x.to(dtype))
    return call


def recompute_point(target, *args, **kwargs) -> tuple[Tensor, Tensor]:
    """``(x, x_in)`` with ``x = target(*args, **kwargs)``: the producer of recomputable adapter
    inputs; ``x`` goes to the producer's users, ``x_in`` to the adapters' down-projections.

    Eager (and ``no_grad``) it is the plain call and ``x_in`` is ``x``.  When ``torch.compile``
    traces it with grad enabled and recomputing is free (the producer's own backward keeps its
    inputs: see :mod:`lora_fx.recompute`), the call runs under ``torch.utils.checkpoint.checkpoint(...,
    use_reentrant=False)``, so AOTAutograd's partitioner recomputes ``x`` in backward instead of
    saving it for the adapters.  Under autocast, where ``F.linear`` reads ``x`` through a
    low-precision cast and that cast is what the adapters would keep, the same region also makes
    the cast and returns it as ``x_in``: the site's base op makes the same cast later in the graph,
    AOTAutograd's common-subexpression pass keeps the first copy (this recomputable one), and the
    cast is recomputed too.  Values and gradients are those of the plain call.

    Args:
        target: a key of :data:`POINT_TARGETS` (the function the node stood for), or the stock leaf
            module it called (its type and hooks are read as it runs: a hooked or swapped leaf is
            called plainly).
        args, kwargs: the call's arguments.

    Returns:
        ``(x, x_in)``: the call's result, and the tensor the adapters read (``x``, or while compiling
        under autocast ``x`` in the autocast dtype).
    """
    fn = target if isinstance(target, nn.Module) else POINT_TARGETS[target][1]
    # torch.export (strict or not) keeps the plain call: an exported program holds no checkpoint regions
    if (torch.compiler.is_compiling() and not torch.compiler.is_exporting() and torch.is_grad_enabled()
            and _point_is_free(target, args, kwargs)):
        out = _checkpoint.checkpoint(_with_input(fn), *args, use_reentrant=False, preserve_rng_state=False,
                                     **kwargs)
        return out[0], out[-1]
    x = fn(*args, **kwargs)
    return x, x
