"""Weight kinds of torchao's quantized tensor subclasses (imported by :mod:`lora_fx.weights` the
first time it sees a torchao tensor; never by ``import lora_fx``).

torchao keeps a quantized weight in the ``nn.Linear`` (``nn.Embedding``) it came from, as a tensor
subclass that reports the logical shape and the original dtype (``quantize_(model, config)``,
``to_nf4(w)``, ``from_pretrained(..., quantization_config=TorchAoConfig(...))``).  Per kind:

=======================  ===================================  ===============  =====================
kind (entry)             made by                              native ops       input gradient
=======================  ===================================  ===============  =====================
``torchao-nf4``          ``to_nf4``, ``NF4WeightOnlyConfig``  linear           exact
``torchao-int8``         ``Int8WeightOnlyConfig``             linear, embed.   exact
``torchao-int8-dynamic`` ``Int8DynamicActivationInt8Weight…`` linear           straight-through
``torchao-intx``         ``IntxWeightOnlyConfig`` (int1–8)    linear, embed.   exact (dynamic: s.-t.)
``torchao-float8``       ``Float8WeightOnlyConfig``           linear, embed.   exact
``torchao-int4-cpu``     ``PrototypeInt4WeightOnlyConfig``    linear           none (inference only)
=======================  ===================================  ===============  =====================

Every kind routes ``nn.Linear`` through :func:`lora_fx.ops_quantized.quantized_linear`
(:attr:`~lora_fx.weights.WeightKind.frozen_linear`): torchao's own linear backward keeps a
weight-sized float copy of int8 / intx / float8 weights per layer, gives no input gradient at all
for the dynamic-activation kinds, and the int4 CPU kernel has no backward.  Notes on torchao 0.18
the entries work around: ``W.to(dtype)`` / ``W.float()`` does not dequantize most kinds (it
returns the quantized tensor), so nothing here uses it; ``NF4Tensor.t()`` keeps the untransposed
shape, so NF4 only computes ``linear``; NF4 needs ``numel`` divisible by ``block_size ·
scaler_block_size`` (``to_nf4``'s defaults: 64 · 256).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchao.quantization import Float8Tensor, Int8Tensor, IntxUnpackedToInt8Tensor, NF4Tensor, to_nf4
from torchao.quantization.granularity import PerGroup, PerRow, PerTensor

from . import WeightKind, register_weight_kind
from .nf4 import dequantize_nf4

try:  # a prototype of torchao 0.18 (tinygemm CPU kernel): absent from other releases
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
except ImportError:  # pragma: no cover - depends on the installed torchao
    Int4OpaqueTensor = None

__all__ = ["TorchaoKind", "NF4Kind", "Int8Kind", "IntxKind", "Float8Kind", "Int4CpuKind", "inner_nbytes"]


def inner_nbytes(w: Tensor) -> int:
    """Bytes of the plain tensors inside a (possibly nested) wrapper tensor subclass."""
    if type(w) in (torch.Tensor, torch.nn.Parameter) or not hasattr(type(w), "__tensor_flatten__"):
        return w.untyped_storage().nbytes() if w.numel() else 0
    names, _ = w.__tensor_flatten__()
    return sum(inner_nbytes(getattr(w, n)) for n in names if isinstance(getattr(w, n), Tensor))


def _granularity(w: Tensor):
    """The granularity a torchao tensor was quantized with, from its ``block_size``."""
    block = list(w.block_size)
    if block == list(w.shape):
        return PerTensor()
    if block[-1] == w.shape[-1] and all(b == 1 for b in block[:-1]):
        return PerRow()
    return PerGroup(block[-1])


class TorchaoKind(WeightKind):
    """What every torchao kind shares: the logical shape and dtype are the tensor's own, the weight
    is never written (PiSSA refuses it), an adapted model sharing the user's weights holds the very
    same tensor object, and linears go through the frozen-base op."""

    name = "torchao"
    native_ops = frozenset({"linear"})
    frozen_linear = True

    def dequantize(self, w: Tensor) -> Tensor:
        return w.dequantize()

    def linear(self, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
        return F.linear(x, w, bias)  # torchao's own kernel for the kind

    def writable(self, w: Tensor) -> bool:
        return False

    def share(self, w: Tensor) -> Tensor:
        return w  # frozen and never written: the same object

    def nbytes(self, w: Tensor) -> int:
        return inner_nbytes(w)


class NF4Kind(TorchaoKind):
    """``NF4Tensor`` (QLoRA's NormalFloat4 with double-quantized scales): dequantized by
    :func:`lora_fx.weights.nf4.dequantize_nf4` (bitwise equal to ``get_original_weight``, leaner
    and faster), in the forward and again in backward, never kept."""

    name = "torchao-nf4"

    def dequantize(self, w: Tensor) -> Tensor:
        return dequantize_nf4(w)

    def linear(self, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
        # what torchao's NF4 linear computes: F.linear on the weight in the input's dtype
        return F.linear(x, dequantize_nf4(w).to(x.dtype), None if bias is None else bias.to(x.dtype))

    def requantize(self, w: Tensor, value: Tensor) -> Tensor:
        return to_nf4(value.to(w.dtype).contiguous(), w.block_size, w.scaler_block_size)


class _MaybeDynamicKind(TorchaoKind):
    """A torchao kind that may quantize its input as well (``act_attr`` names the tensor attribute
    that says how; None: weight-only): weight-only runs linear and embedding exactly; with its
    input quantized the kernel passes no input gradient (straight-through) and serves linear only."""

    native_ops = frozenset({"linear", "embedding"})
    act_attr = "act_quant_kwargs"

    def input_grad(self, w: Tensor) -> str:
        return "exact" if getattr(w, self.act_attr) is None else "straight-through"

    def runs(self, w: Tensor, op: str) -> bool:
        return op in self.native_ops if getattr(w, self.act_attr) is None else op == "linear"


class Int8Kind(_MaybeDynamicKind):
    """``Int8Tensor``: int8 weight-only (``act_quant_kwargs is None``) or with dynamic int8
    activations (``Int8DynamicActivationInt8WeightConfig``), whose forward quantizes its input
    per token: the input gradient is then straight-through."""

    name = "torchao-int8"

    def requantize(self, w: Tensor, value: Tensor) -> Tensor:
        return Int8Tensor.from_hp(value.to(w.dtype), _granularity(w), act_quant_kwargs=w.act_quant_kwargs,
                                  reduce_range=w.reduce_range)


class IntxKind(_MaybeDynamicKind):
    """``IntxUnpackedToInt8Tensor`` (``IntxWeightOnlyConfig``: int1–int8 codes stored one per int8,
    so int4 takes as much memory as int8); with ``activation_quantization`` set
    (``Int8DynamicActivationIntxWeightConfig``) the input gradient is straight-through."""

    name = "torchao-intx"
    act_attr = "activation_quantization"

    def requantize(self, w: Tensor, value: Tensor) -> Tensor:
        return IntxUnpackedToInt8Tensor.from_hp(value.to(w.dtype), tuple(w.block_size), w.target_dtype,
                                                activation_quantization=w.activation_quantization)


class Float8Kind(_MaybeDynamicKind):
    """``Float8Tensor`` (``Float8WeightOnlyConfig``; with ``act_quant_kwargs`` the dynamic kinds,
    straight-through)."""

    name = "torchao-float8"

    def requantize(self, w: Tensor, value: Tensor) -> Tensor:
        return Float8Tensor.from_hp(value.to(w.dtype), w.qdata.dtype, _granularity(w), mm_config=w.mm_config,
                                    kernel_preference=w.kernel_preference, act_quant_kwargs=w.act_quant_kwargs)


class Int4CpuKind(TorchaoKind):
    """``Int4OpaqueTensor`` (``PrototypeInt4WeightOnlyConfig``, tinygemm's CPU layout, bf16): its
    kernel has no backward and torchao no dequantization, so the weight serves inference and
    adapter hot-swapping only.  :meth:`dequantize` runs the kernel on the identity (exact: one
    product per output, cost ``in² · out``)."""

    name = "torchao-int4-cpu"

    def dequantize(self, w: Tensor) -> Tensor:
        eye = torch.eye(w.shape[1], dtype=w.dtype, device=w.device)
        return F.linear(eye, w).t().contiguous()

    def input_grad(self, w: Tensor) -> str:
        return "none"

    def requantize(self, w: Tensor, value: Tensor) -> Tensor:
        return Int4OpaqueTensor.from_hp(value.to(torch.bfloat16).contiguous(), list(w.block_size))


register_weight_kind(NF4Tensor, NF4Kind())
register_weight_kind(Int8Tensor, Int8Kind())
register_weight_kind(IntxUnpackedToInt8Tensor, IntxKind())
register_weight_kind(Float8Tensor, Float8Kind())
if Int4OpaqueTensor is not None:
    register_weight_kind(Int4OpaqueTensor, Int4CpuKind())
