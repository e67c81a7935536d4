"""Lazy LoRA weights: ``W + Σ s·ΔW`` handed to code that reads the weight itself, computed factored.

A :class:`LoraWeight` is a ``torch.Tensor`` subclass whose data *is* the base weight ``W`` (no copy)
and which carries one or more adapters' factors.  It stands in for a stack of expert matrices
``W (E, d1, d2)`` when a module's own Python consumes the stack one expert at a time (Hugging Face
MoE experts: ``F.linear(x, W[e])`` in a loop, ``grouped_mm(x, W.transpose(-2, -1), offs)``,
``bmm(W[ids], x)``), so that every op sees ``W[e] + ΔW[e]`` without an ``(E, out, in)`` delta:

* factors, per expert ``e``: ``A[e] (r, in)``, ``B[e] (out, r)``, ``ΔW[e] = s·B[e] @ A[e]`` in the
  ``(out, in)`` orientation the op consumes (``F.linear(x, W[e])``); a stack stored ``(E, in, out)``
  (``x @ W[e]``) is ``transposed``: its storage holds ``ΔW[e]ᵀ``;
* views stay lazy and index the factors: ``W[e]`` (an int or 0-d index), ``W[ids]`` (a 1-D index:
  the factors are gathered, ``(S, r, ·)``, never the weights), ``W.transpose(-2, -1)`` / ``.mT`` /
  ``.t()`` (the orientation flips), ``.to(W.dtype)``, ``.contiguous()``;
* consumers linear in the weight are factored: ``F.linear(x, V)``, ``x @ V`` / ``V @ x``,
  ``torch._grouped_mm(x, V, offs=...)`` (also ``F.grouped_mm`` and transformers'
  ``grouped_mm_fallback``), ``torch.bmm``, in both their Python and ATen forms (so a lazy weight
  also works inside a ``torch.export`` graph);
* metadata (shape, dtype, device, strides, ...) answers for ``W``;
* **any other op gets the merged value** ``W_view + ΔW_view``: exact, as costly as merging, and
  reported once with a :class:`~lora_fx.errors.LoraFxWarning` naming the op.

Under ``torch.compile`` the handlers trace like the ops they call (one graph, no breaks); nothing
here mutates Python state in a forward, except the one-time warning outside compilation.
:func:`probe` runs a module once with zero factors to find which consumers it uses and so the
orientation the op consumes (used at transform time by :mod:`lora_fx.rules.experts`).
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoraFxWarning

__all__ = ["LoraWeight", "Factor", "HANDLERS", "register_lazy_handler", "register_transformers_ops", "probe",
           "probing"]

#: One adapter's factors on a (view of a) stack: ``(A (..., r, in), B (..., out, r), scaling (0-dim),
#: dropout module or None)``; the leading dims are the view's leading dims.
Factor = tuple[Tensor, Tensor, Tensor, Optional[nn.Module]]

_aten = torch.ops.aten


class LoraWeight(Tensor):
    """``W + Σ_i s_i·ΔW_i`` with ``ΔW_i = B_i @ A_i`` (transposed when ``transposed``), evaluated lazily.

    Args:
        base: the base weight or a view of it, ``(*lead, d1, d2)`` (``d1, d2 = out, in``, or
            ``in, out`` when ``transposed``); the tensor's data is ``base`` itself.
        factors: one :data:`Factor` per adapter, with the same leading dims as ``base``.
        transposed: ``base`` holds ``(W_(out,in) + ΔW)ᵀ``: the op consumes it as ``(in, out)``.
    """

    _w: Tensor
    _f: tuple
    _t: bool

    @staticmethod
    def __new__(cls, base: Tensor, factors: Sequence[Factor], transposed: bool = False):
        with torch._C.DisableTorchFunctionSubclass():
            t = base.as_subclass(cls)
        t._w, t._f, t._t = base, tuple(factors), bool(transposed)
        return t

    def __repr__(self, *, tensor_contents=None) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            return (f"LoraWeight(shape={tuple(self._w.shape)}, adapters={len(self._f)}, "
                    f"transposed={self._t}, dtype={self._w.dtype})")

    def delta(self) -> Tensor:
        """``Σ s·ΔW`` of this view in the base's orientation and dtype (weight-sized: only for the
        merged fallback)."""
        with torch._C.DisableTorchFunctionSubclass():
            return _delta(self._w, self._f, self._t)

    def merged(self) -> Tensor:
        """The plain tensor ``W_view + Σ s·ΔW_view`` (exact; a weight-sized temporary)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self._w + _delta(self._w, self._f, self._t)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = HANDLERS.get(func)
        with torch._C.DisableTorchFunctionSubclass():
            if handler is not None:
                out = handler(func, args, kwargs)
                if out is not NotImplemented:
                    return out
            if func in _META:
                return func(*_bases(args), **kwargs)
            _note_merge(func)
            return func(*_merged_args(args), **_merged_kwargs(kwargs))


def _delta(w: Tensor, factors: tuple, transposed: bool) -> Tensor:
    d = None
    for a, b, s, _ in factors:
        term = (b @ a) * s
        d = term if d is None else d + term
    if transposed:
        d = d.transpose(-2, -1)
    return d.to(w.dtype)


def _bases(args):
    return tuple(a._w if isinstance(a, LoraWeight) else a for a in args)


def _merged_args(args):
    return tuple(_merge_value(a) for a in args)


def _merged_kwargs(kwargs):
    return {k: _merge_value(v) for k, v in kwargs.items()}


def _merge_value(v):
    if isinstance(v, LoraWeight):
        return v._w + _delta(v._w, v._f, v._t)
    if isinstance(v, (list, tuple)):
        return type(v)(_merge_value(x) for x in v)
    return v


# ---------------------------------------------------------------------------------------------
# probing and the one-time warning (the only Python state touched, never while compiling)

_PROBE: Optional[list] = None
_WARNED: set = set()


def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    owner = getattr(func, "__self__", None)
    return f"{getattr(owner, '__name__', '')}.{name}".lstrip(".") if name == "__get__" else str(name)


def _seen(kind: str) -> None:
    if _PROBE is not None:
        _PROBE.append(kind)


def _note_merge(func) -> None:
    if _PROBE is not None:
        _PROBE.append("merge:" + _op_name(func))
        return
    if torch.compiler.is_compiling():
        return
    name = _op_name(func)
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"a LoRA-adapted expert weight reached {name}, which has no factored form: it gets the "
                      "merged weight W + ΔW (exact, but it builds a weight-sized temporary on every call). "
                      "lora_fx.sites() reports such sites with lowering 'merge'.", LoraFxWarning, stacklevel=3)


@contextlib.contextmanager
def probing() -> Iterator[list]:
    """Within the block, every factored consumer and merged fallback a :class:`LoraWeight` meets is
    appended to the yielded list (``"linear"``, ``"grouped_mm"``, ``"bmm"``, ``"matmul"``,
    ``"merge:<op>"``) instead of warning."""
    global _PROBE
    saved, _PROBE = _PROBE, []
    try:
        yield _PROBE
    finally:
        _PROBE = saved


def probe(module: nn.Module, name: str, args: tuple, kwargs: Optional[dict] = None, *,
          rank: int = 1) -> Optional[tuple[bool, tuple[str, ...]]]:
    """How ``module(*args, **kwargs)`` consumes its 3-D parameter ``name``.

    Runs the module once under ``no_grad`` with ``name`` replaced by a :class:`LoraWeight` with
    zero factors of ``rank``, first in the storage orientation ``(E, out, in)``, then flipped
    ``(E, in, out)``.  Returns ``(transposed, consumers)`` for the first orientation in which every
    read was factored, or None when neither was (the module then gets merged values at run time).
    """
    w = module.get_parameter(name)
    for transposed in (False, True):
        e, d1, d2 = w.shape
        out_f, in_f = (d2, d1) if transposed else (d1, d2)
        factor = (w.new_zeros(e, rank, in_f), w.new_zeros(e, out_f, rank), w.new_zeros(()), None)
        with probing() as seen, torch.no_grad():
            torch.func.functional_call(module, {name: LoraWeight(w, (factor,), transposed)}, args, kwargs or {},
                                       strict=False, tie_weights=False)
        if seen and not any(k.startswith("merge:") for k in seen):
            return transposed, tuple(dict.fromkeys(seen))
    return None


# ---------------------------------------------------------------------------------------------
# handlers: view ops keep the weight lazy, consumers compute factored


#: ``{function or op overload: handler(func, args, kwargs) -> result or NotImplemented}``.
HANDLERS: dict[Callable, Callable] = {}


def register_lazy_handler(*funcs: Callable):
    """Decorator: ``handler(func, args, kwargs)`` handles calls of ``funcs`` that receive a
    :class:`LoraWeight` (returning ``NotImplemented`` falls back to the merged value).  Runs with
    ``__torch_function__`` disabled, so tensor methods inside act on plain tensors."""

    def deco(handler):
        for f in funcs:
            HANDLERS[f] = handler
        return handler

    return deco


_META = {
    Tensor.size, Tensor.dim, Tensor.stride, Tensor.numel, Tensor.data_ptr, Tensor.is_contiguous,
    Tensor.element_size, Tensor.__len__, Tensor.is_floating_point, Tensor.storage_offset, Tensor.get_device,
    Tensor.ndimension, Tensor.nelement, Tensor.untyped_storage, Tensor.is_complex, Tensor.__format__,
} | {getattr(Tensor, n).__get__ for n in ("shape", "dtype", "device", "ndim", "requires_grad", "is_cuda",
                                          "is_cpu", "is_meta", "layout", "is_sparse", "is_quantized",
                                          "is_leaf", "grad_fn", "names", "is_nested", "itemsize", "nbytes",
                                          "grad", "data", "_version", "is_mkldnn", "is_xpu", "is_mps")
    if hasattr(Tensor, n)}


def _lazy(w: LoraWeight, base: Tensor, factors, transposed: bool) -> LoraWeight:
    return LoraWeight(base, factors, transposed)


def _is_lead_index(idx) -> bool:
    if isinstance(idx, int) and not isinstance(idx, bool):
        return True
    return isinstance(idx, Tensor) and not idx.is_floating_point() and idx.dtype != torch.bool and idx.dim() <= 1


def _index(w: LoraWeight, idx) -> LoraWeight:
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (isinstance(idx, int) or (isinstance(idx, Tensor) and idx.dim() == 0))):
        # one expert of a Python loop: views of the factors unbound once per forward, so the backward
        # stacks one (E, r, ·) gradient per factor instead of one per expert read
        units = w.__dict__.get("_units")
        if units is None:
            units = w.__dict__["_units"] = [(a.unbind(0), b.unbind(0)) for a, b, _, _ in w._f]
        e = int(idx)
        return LoraWeight(w._w[idx], tuple((ua[e], ub[e], s, d) for (ua, ub), (_, _, s, d) in zip(units, w._f)),
                          w._t)
    return LoraWeight(w._w[idx], tuple((a[idx], b[idx], s, d) for a, b, s, d in w._f), w._t)


@register_lazy_handler(Tensor.__getitem__)
def _getitem(func, args, kwargs):
    w, idx = args[0], args[1]
    if isinstance(idx, tuple) and len(idx) == 1:
        idx = idx[0]
    if not isinstance(w, LoraWeight) or w._w.dim() < 3 or not _is_lead_index(idx):
        return NotImplemented
    return _index(w, idx)


@register_lazy_handler(_aten.index.Tensor)
def _aten_index(func, args, kwargs):
    w, indices = args[0], args[1]
    if not isinstance(w, LoraWeight) or w._w.dim() < 3 or len(indices) != 1 or not _is_lead_index(indices[0]):
        return NotImplemented
    return _index(w, indices[0])


@register_lazy_handler(Tensor.select, torch.select, _aten.select.int)
def _select(func, args, kwargs):
    w = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    index = args[2] if len(args) > 2 else kwargs.get("index")
    if not isinstance(w, LoraWeight) or w._w.dim() < 3 or dim not in (0, -w._w.dim()):
        return NotImplemented
    return _index(w, index)


def _flip(w: LoraWeight) -> LoraWeight:
    return LoraWeight(w._w.transpose(-2, -1), w._f, not w._t)


@register_lazy_handler(Tensor.transpose, torch.transpose, _aten.transpose.int, Tensor.swapaxes, torch.swapaxes)
def _transpose(func, args, kwargs):
    w = args[0]
    if not isinstance(w, LoraWeight):
        return NotImplemented
    n = w._w.dim()
    dims = tuple(args[1:3]) or (kwargs.get("dim0"), kwargs.get("dim1"))
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims) or sorted(d % n for d in dims) != [n - 2, n - 1]:
        return NotImplemented
    return _flip(w)


@register_lazy_handler(Tensor.mT.__get__, Tensor.t, torch.t, _aten.t.default, Tensor.T.__get__)
def _mt(func, args, kwargs):
    w = args[0]
    if not isinstance(w, LoraWeight) or (func is not Tensor.mT.__get__ and w._w.dim() != 2):
        return NotImplemented
    return _flip(w)


@register_lazy_handler(Tensor.to, Tensor.type_as, Tensor.contiguous, _aten.contiguous.default, _aten.alias.default)
def _same(func, args, kwargs):
    w = args[0]
    if not isinstance(w, LoraWeight):
        return NotImplemented
    if func in (Tensor.contiguous, _aten.contiguous.default, _aten.alias.default):
        return w if not kwargs else NotImplemented
    target = args[1] if len(args) == 2 and not kwargs else kwargs.get("dtype") if set(kwargs) == {"dtype"} else None
    if isinstance(target, Tensor):
        target = target.dtype
    return w if target == w._w.dtype else NotImplemented


def _down(x: Tensor, a: Tensor, s: Tensor, drop) -> Tensor:
    x = drop(x) if drop is not None else x
    return F.linear(x.to(a.dtype), a) * s


def _linear_delta(y: Tensor, x: Tensor, factors) -> Tensor:
    """``y + Σ s·(x Aᵀ) Bᵀ`` (2-D factors)."""
    for a, b, s, drop in factors:
        y = y + F.linear(_down(x, a, s, drop), b).to(y.dtype)
    return y


@register_lazy_handler(F.linear, _aten.linear.default)
def _linear(func, args, kwargs):
    x = args[0]
    w = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if isinstance(x, LoraWeight) or isinstance(bias, LoraWeight) or not isinstance(w, LoraWeight) \
            or w._w.dim() != 2 or w._t:
        return NotImplemented
    _seen("linear")
    return _linear_delta(func(x, w._w, bias), x, w._f)


@register_lazy_handler(torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.mm, Tensor.mm, _aten.mm.default,
                       _aten.matmul.default)
def _matmul(func, args, kwargs):
    if len(args) != 2 or kwargs:
        return NotImplemented
    x, w = args
    if isinstance(w, LoraWeight) and not isinstance(x, LoraWeight) and w._w.dim() == 2 and w._t:
        _seen("matmul")  # x @ V with V = (W + ΔW)ᵀ: y + Σ s·(x Aᵀ) Bᵀ
        return _linear_delta(func(x, w._w), x, w._f)
    w, x = args
    if isinstance(w, LoraWeight) and not isinstance(x, LoraWeight) and w._w.dim() == 2 and not w._t \
            and x.dim() >= 2:
        _seen("matmul")  # V @ x = W @ x + Σ s·B (A x)
        y = func(w._w, x)
        for a, b, s, drop in w._f:
            y = y + (b @ (a @ (drop(x) if drop is not None else x).to(a.dtype)) * s).to(y.dtype)
        return y
    return NotImplemented


@register_lazy_handler(torch.bmm, Tensor.bmm, _aten.bmm.default)
def _bmm(func, args, kwargs):
    if len(args) != 2 or kwargs:
        return NotImplemented
    p, q = args
    if isinstance(p, LoraWeight) and not isinstance(q, LoraWeight) and p._w.dim() == 3 and not p._t:
        _seen("bmm")  # V x, V (S, out, in), x (S, in, k): + s·B (A x)
        y = func(p._w, q)
        for a, b, s, drop in p._f:
            h = torch.bmm(a, (drop(q) if drop is not None else q).to(a.dtype)) * s
            y = y + torch.bmm(b, h).to(y.dtype)
        return y
    if isinstance(q, LoraWeight) and not isinstance(p, LoraWeight) and q._w.dim() == 3 and q._t:
        _seen("bmm")  # x V, x (S, k, in), V (S, in, out): + s·(x Aᵀ) Bᵀ
        y = func(p, q._w)
        for a, b, s, drop in q._f:
            h = torch.bmm((drop(p) if drop is not None else p).to(a.dtype), a.transpose(1, 2)) * s
            y = y + torch.bmm(h, b.transpose(1, 2)).to(y.dtype)
        return y
    return NotImplemented


def _pad_rank(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-pad the rank to a multiple of ``16 / itemsize``: CPU and CUDA grouped GEMM kernels need
    every non-unit stride to be a multiple of 16 bytes.  Exact: the padded rows of ``A`` and columns
    of ``B`` are zero, and so are their gradients."""
    m = max(1, 16 // a.element_size())
    pad = -a.shape[-2] % m
    if pad:
        a, b = F.pad(a, (0, 0, 0, pad)), F.pad(b, (0, pad))
    return a.contiguous(), b.contiguous()


def _grouped_delta(y: Tensor, x: Tensor, factors, offs: Tensor, gmm: Callable, native: bool) -> Tensor:
    """``y + Σ s·gmm(gmm(x, Aᵀ), Bᵀ)`` per group: ``A (E, r, in)``, ``B (E, out, r)``."""
    for a, b, s, drop in factors:
        if native:
            a, b = _pad_rank(a, b)
        xi = drop(x) if drop is not None else x
        h = gmm(xi.to(a.dtype), a.transpose(-2, -1), offs=offs) * s
        y = y + gmm(h.to(b.dtype), b.transpose(-2, -1), offs=offs).to(y.dtype)
    return y


def _grouped(func, args, kwargs):
    x = args[0]
    w = args[1] if len(args) > 1 else kwargs.get("mat2", kwargs.get("weight"))
    offs = args[2] if len(args) > 2 else kwargs.get("offs")
    extra = {k: v for k, v in kwargs.items() if k not in ("offs", "mat2", "weight") and v is not None}
    if isinstance(x, LoraWeight) or not isinstance(w, LoraWeight) or w._w.dim() != 3 or not w._t \
            or offs is None or extra or x.dim() != 2:
        return NotImplemented
    _seen("grouped_mm")
    native = func in _NATIVE_GMM
    y = func(x, w._w, offs=offs) if native else func(x, w._w, offs)
    gmm = torch._grouped_mm if native else _fallback_gmm(func)
    return _grouped_delta(y, x, w._f, offs, gmm, native)


def _fallback_gmm(func):
    def call(a, b, offs):
        return func(a, b, offs)
    return call


_NATIVE_GMM = {torch._grouped_mm, _aten._grouped_mm.default}
register_lazy_handler(*_NATIVE_GMM)(_grouped)


def register_transformers_ops() -> None:
    """Add transformers' ``torch.ops.transformers.grouped_mm_fallback`` (the grouped GEMM its MoE
    experts use under ``torch.compile`` and ``torch.export``) to the handler table, once
    ``transformers.integrations.moe`` has registered it; a no-op otherwise."""
    if "transformers.integrations.moe" not in sys.modules:
        return
    try:
        packet = torch.ops.transformers.grouped_mm_fallback
    except (AttributeError, RuntimeError):
        return
    for f in (packet, packet.default):
        HANDLERS.setdefault(f, _grouped)


register_transformers_ops()
