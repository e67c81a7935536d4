"""The weight seam: how lora_fx reads and writes each kind of base weight.

Every place that reads a base weight asks this module, never the tensor itself: the analysis
(whether a weight can be adapted, and its shape), the adapter factory (the factors' shape and
dtype, the rank warning), :meth:`lora_fx.LoraConfig.dtype_for`, the merge lowering (the weight a
merge reads), fold, PiSSA and DoRA initialisation, and PEFT files (module shapes).  A weight kind
is looked up by the weight's type (its most specific registered class), so a plain
``torch.Tensor`` / ``nn.Parameter`` and any tensor subclass without an entry get :data:`TENSOR`.

A new kind of weight (a quantized tensor subclass, say) is one :class:`WeightKind` subclass and one
:func:`register_weight_kind` call, in one file that imports its backend.  The interface fits
storage that is not the tensor the op consumes:

* ``shape``: the *logical* ``(out, in...)`` shape the op consumes, which may differ from the
  storage shape (bitsandbytes' ``Params4bit`` stores packed bytes ``(n/2, 1)`` and keeps the
  logical shape in ``quant_state.shape``; torchao's ``NF4Tensor`` reports it as ``.shape``);
* ``dtype``: the dtype of :meth:`WeightKind.dequantize` (the compute dtype: ``quant_state.dtype``,
  or the ``dtype`` a torchao subclass reports), which decides the factors' default dtype;
* ``dequantize``: a float tensor of the logical shape (``get_original_weight()``,
  ``.dequantize()``, ``bitsandbytes.functional.dequantize_4bit(w.data, w.quant_state)``);
* ``fold_into``: a new weight holding ``update(dequantize(W))`` (fp32 accumulation, one rounding),
  out of place; a quantized kind may return a float weight or requantize;
* ``writable`` / ``write_``: whether (and how) PiSSA may write its residual into the weight;
* ``reason``: why a weight of this kind cannot be adapted (1-D, integer), or None;
* ``runs``: whether an op kind runs on the weight itself (the factored form calls ``op(x, W)``;
  elsewhere the site is merged, by dequantizing);
* ``frozen_linear`` / ``linear`` / ``input_grad``: whether ``nn.Linear`` / ``F.linear`` on the
  weight go through :func:`lora_fx.ops_quantized.quantized_linear` (a frozen-base linear that
  keeps no dequantized copy for backward), its forward, and how its input gradient is formed;
* ``requantize``: the folded float value back in the weight's own scheme (``fold(requantize=True)``);
* ``share``: the weight an adapted model uses when it shares the user's weights (``copy_weights=False``);
* ``nbytes``: the bytes the weight really holds (packed data and quantization statistics).

Quantized backends live in one file each (:mod:`.torchao`, :mod:`.bnb`), imported the first time
:func:`kind_of` sees a tensor of that library (:data:`BACKENDS`), so importing lora_fx never imports
torchao or bitsandbytes.
"""

from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["WeightKind", "TENSOR", "BACKENDS", "register_weight_kind", "kind_of", "logical_shape", "compute_dtype",
           "dequantize", "fold_into", "writable", "write_", "reason", "is_plain", "runs", "requantize", "share",
           "nbytes", "INPUT_GRADS"]

#: How :func:`lora_fx.ops_quantized.quantized_linear` forms the input gradient of a frozen linear
#: on a weight (:meth:`WeightKind.input_grad`): ``"exact"`` (``∂x = g · dequantize(W)``: the
#: gradient of the op, which computes with ``dequantize(W)``), ``"straight-through"`` (the op
#: quantizes its input too, e.g. torchao's dynamic-activation kinds; ``g · dequantize(W)`` treats
#: that rounding as identity) or ``"none"`` (no backward: the weight serves inference only).
INPUT_GRADS = ("exact", "straight-through", "none")


class WeightKind:
    """How lora_fx reads and writes one kind of base weight.  The defaults are those of a plain
    floating-point tensor; a subclass overrides what differs for its kind.

    Attributes:
        name: shown in messages (e.g. ``"tensor"``, ``"torchao-nf4"``).
        native_ops: the op kinds (:attr:`lora_fx.Site.op` values such as ``"linear"``,
            ``"embedding"``) the weight's own type computes, or None for every op (a plain tensor).
            A site whose op is not among them is lowered by merging ``dequantize(W) + ΔW``.
        frozen_linear: ``nn.Linear`` modules and ``F.linear`` calls on the weight are routed through
            :func:`lora_fx.ops_quantized.quantized_linear` (see :meth:`linear`, :meth:`input_grad`).
    """

    name = "tensor"
    native_ops: Optional[frozenset] = None
    frozen_linear = False

    def shape(self, w: Tensor) -> tuple[int, ...]:
        """The logical ``(out, in...)`` shape the consuming op sees."""
        return tuple(w.shape)

    def dtype(self, w: Tensor) -> torch.dtype:
        """The dtype of :meth:`dequantize` (the weight's compute dtype)."""
        return w.dtype

    def module_linear(self, x: Tensor, w: Tensor, bias: Optional[Tensor], state, training: bool) -> Optional[Tensor]:
        """``x Wᵀ + b`` as the weight's own module computes it from its ``state`` in this mode,
        where that differs from :meth:`linear` (bitsandbytes 8-bit inference); None: :meth:`linear`."""
        return None

    def dtype_recorded(self, w: Tensor) -> bool:
        """Whether :meth:`dtype` is a record the weight keeps (False: a guess, such as bitsandbytes
        8-bit's float16; :func:`lora_fx.fold` then takes the model's own float dtype)."""
        return True

    def dequantize(self, w: Tensor) -> Tensor:
        """``W`` as a floating tensor of :meth:`shape` and :meth:`dtype` (may be ``w`` itself)."""
        return w

    def fold_into(self, w: Tensor, update: Callable[[Tensor], Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
        """A new weight holding ``update(dequantize(w))``, out of place: a plain tensor of
        :meth:`dtype` (or of ``dtype``, when given) and the logical shape.

        ``update`` receives the dequantized weight in float32 (or wider, for float64 weights),
        detached, and returns the folded value in that dtype (e.g. ``base + ΔW``); the result is
        rounded once.  ``w`` is not modified.  A quantized kind folds into a float weight by this
        default; :meth:`requantize` puts it back into the kind's scheme.
        """
        out = dtype or self.dtype(w)
        compute = torch.promote_types(torch.promote_types(self.dtype(w), out), torch.float32)
        return update(self.dequantize(w).detach().to(compute)).to(out)

    def requantize(self, w: Tensor, value: Tensor) -> Tensor:
        """A new weight of ``w``'s kind and scheme (block size, data type, statistics layout) holding
        ``value`` (logical shape, float), quantized afresh; ``w`` is not modified.  A plain tensor
        returns ``value`` in ``w``'s dtype.

        Raises:
            NotImplementedError: the kind cannot quantize (the message names it).
        """
        return value.to(self.dtype(w))

    def runs(self, w: Tensor, op: str) -> bool:
        """Whether the op kind ``op`` computes on ``w`` itself (see :attr:`native_ops`)."""
        return self.native_ops is None or op in self.native_ops

    def linear(self, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
        """The forward of ``F.linear(x, W, bias)`` on ``w`` with no autograd (used by
        :func:`lora_fx.ops_quantized.quantized_linear` when :attr:`frozen_linear`): the kind's own
        kernel, or ``F.linear`` on :meth:`dequantize` in ``x``'s dtype."""
        return F.linear(x, w, bias)

    def input_grad(self, w: Tensor) -> str:
        """How the input gradient of a frozen linear on ``w`` is formed (one of :data:`INPUT_GRADS`)."""
        return "exact"

    def share(self, w: Tensor) -> Tensor:
        """The parameter an adapted model holds for ``w`` when it shares the user's weights
        (``transform(..., copy_weights=False)``): the same storage, never a copy of it.  Default: a
        new ``nn.Parameter`` over ``w``'s storage (one per parameter object, so ties stay ties)."""
        return nn.Parameter(w.detach(), requires_grad=w.requires_grad)

    def nbytes(self, w: Tensor) -> int:
        """Bytes ``w`` holds in memory (for a quantized kind: packed data plus statistics)."""
        return w.untyped_storage().nbytes() if w.numel() else 0

    def writable(self, w: Tensor) -> bool:
        """Whether :meth:`write_` can store a new value into ``w`` in place (PiSSA's residual)."""
        return True

    def write_(self, w: Tensor, value: Tensor) -> Tensor:
        """Store ``value`` (logical shape, any float dtype) into ``w`` in place, rounded once; returns ``w``."""
        with torch.no_grad():
            w.copy_(value.reshape(w.shape).to(w.dtype))
        return w

    def reason(self, w: Tensor) -> Optional[str]:
        """Why ``w`` cannot be adapted, or None.  LoRA adapts floating weights of 2 or more dims."""
        shape = self.shape(w)
        if len(shape) < 2:
            return f"it is {len(shape)}-D; LoRA adapts weights with at least 2 dimensions"
        if not self.dtype(w).is_floating_point:
            return f"its dtype {self.dtype(w)} is not floating point"
        return None

    def __repr__(self) -> str:
        return f"<weight kind {self.name!r}>"


#: The kind of a plain ``torch.Tensor`` / ``nn.Parameter`` (and of any unregistered subclass).
TENSOR = WeightKind()

_KINDS: dict[type, WeightKind] = {torch.Tensor: TENSOR}
_CACHE: dict[type, WeightKind] = {}

#: ``{top-level package: lora_fx module with its entries}``: a backend's entries are imported (and
#: register themselves) the first time :func:`kind_of` sees a tensor type defined in that package,
#: which is then imported already; lora_fx itself never imports torchao or bitsandbytes.
BACKENDS = {"torchao": "lora_fx.weights.torchao", "bitsandbytes": "lora_fx.weights.bnb"}
_LOADED: set[str] = set()


def _load_backend(t: type) -> None:
    package = (getattr(t, "__module__", "") or "").partition(".")[0]
    if package in BACKENDS and package not in _LOADED:
        _LOADED.add(package)
        importlib.import_module(BACKENDS[package])  # its register_weight_kind calls fill _KINDS


def register_weight_kind(tensor_type: type, kind: WeightKind) -> None:
    """Use ``kind`` for weights of ``tensor_type`` and its subclasses (the most specific registered
    class of a weight's type wins).

    Raises:
        TypeError: ``tensor_type`` is not a ``torch.Tensor`` subclass or ``kind`` not a :class:`WeightKind`.
    """
    if not (isinstance(tensor_type, type) and issubclass(tensor_type, torch.Tensor)):
        raise TypeError(f"register_weight_kind() needs a torch.Tensor subclass, got {tensor_type!r}")
    if not isinstance(kind, WeightKind):
        raise TypeError(f"register_weight_kind() needs a WeightKind, got {type(kind).__name__}")
    _KINDS[tensor_type] = kind
    _CACHE.clear()


def kind_of(w: Tensor) -> WeightKind:
    """The :class:`WeightKind` of ``w``: the entry of the first class in ``type(w).__mro__`` that has
    one (:data:`TENSOR` for anything else)."""
    t = type(w)
    kind = _CACHE.get(t)
    if kind is None:
        _load_backend(t)
        kind = _CACHE[t] = next((_KINDS[c] for c in t.__mro__ if c in _KINDS), TENSOR)
    return kind


def is_plain(w: Tensor) -> bool:
    """Whether ``w`` is read as it is (its kind is :data:`TENSOR`): ops may consume it directly."""
    return kind_of(w) is TENSOR


def logical_shape(w: Tensor) -> tuple[int, ...]:
    """:meth:`WeightKind.shape` of ``w``'s kind."""
    return kind_of(w).shape(w)


def compute_dtype(w: Tensor) -> torch.dtype:
    """:meth:`WeightKind.dtype` of ``w``'s kind."""
    return kind_of(w).dtype(w)


def dequantize(w: Tensor) -> Tensor:
    """:meth:`WeightKind.dequantize` of ``w``'s kind."""
    return kind_of(w).dequantize(w)


def fold_into(w: Tensor, update: Callable[[Tensor], Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    """:meth:`WeightKind.fold_into` of ``w``'s kind."""
    return kind_of(w).fold_into(w, update, dtype)


def requantize(w: Tensor, value: Tensor) -> Tensor:
    """:meth:`WeightKind.requantize` of ``w``'s kind."""
    return kind_of(w).requantize(w, value)


def runs(w: Tensor, op: str) -> bool:
    """:meth:`WeightKind.runs` of ``w``'s kind."""
    return kind_of(w).runs(w, op)


def share(w: Tensor) -> Tensor:
    """:meth:`WeightKind.share` of ``w``'s kind."""
    return kind_of(w).share(w)


def nbytes(w: Tensor) -> int:
    """:meth:`WeightKind.nbytes` of ``w``'s kind."""
    return kind_of(w).nbytes(w)


def writable(w: Tensor) -> bool:
    """:meth:`WeightKind.writable` of ``w``'s kind."""
    return kind_of(w).writable(w)


def write_(w: Tensor, value: Tensor) -> Tensor:
    """:meth:`WeightKind.write_` of ``w``'s kind."""
    return kind_of(w).write_(w, value)


def reason(w: Tensor) -> Optional[str]:
    """:meth:`WeightKind.reason` of ``w``'s kind."""
    return kind_of(w).reason(w)
