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
* ``reason``: why a weight of this kind cannot be adapted (1-D, integer), or None.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["WeightKind", "TENSOR", "register_weight_kind", "kind_of", "logical_shape", "compute_dtype",
           "dequantize", "fold_into", "writable", "write_", "reason", "is_plain"]


class WeightKind:
    """How lora_fx reads and writes one kind of base weight.  The defaults are those of a plain
    floating-point tensor; a subclass overrides what differs for its kind.

    Attributes:
        name: shown in messages (e.g. ``"tensor"``, ``"nf4"``).
    """

    name = "tensor"

    def shape(self, w: Tensor) -> tuple[int, ...]:
        """The logical ``(out, in...)`` shape the consuming op sees."""
        return tuple(w.shape)

    def dtype(self, w: Tensor) -> torch.dtype:
        """The dtype of :meth:`dequantize` (the weight's compute dtype)."""
        return w.dtype

    def dequantize(self, w: Tensor) -> Tensor:
        """``W`` as a floating tensor of :meth:`shape` and :meth:`dtype` (may be ``w`` itself)."""
        return w

    def fold_into(self, w: Tensor, update: Callable[[Tensor], Tensor]) -> Tensor:
        """A new weight of ``w``'s kind holding ``update(dequantize(w))``, out of place.

        ``update`` receives the dequantized weight in float32 (or wider, for float64 weights),
        detached, and returns the folded value in that dtype (e.g. ``base + ΔW``); the result is
        rounded once.  ``w`` is not modified.
        """
        compute = torch.promote_types(self.dtype(w), torch.float32)
        return update(self.dequantize(w).detach().to(compute)).to(self.dtype(w))

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


def fold_into(w: Tensor, update: Callable[[Tensor], Tensor]) -> Tensor:
    """:meth:`WeightKind.fold_into` of ``w``'s kind."""
    return kind_of(w).fold_into(w, update)


def writable(w: Tensor) -> bool:
    """:meth:`WeightKind.writable` of ``w``'s kind."""
    return kind_of(w).writable(w)


def write_(w: Tensor, value: Tensor) -> Tensor:
    """:meth:`WeightKind.write_` of ``w``'s kind."""
    return kind_of(w).write_(w, value)


def reason(w: Tensor) -> Optional[str]:
    """:meth:`WeightKind.reason` of ``w``'s kind."""
    return kind_of(w).reason(w)
