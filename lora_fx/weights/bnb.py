"""Weight kinds of bitsandbytes' quantized parameters (imported by :mod:`lora_fx.weights` the first
time it sees one; never by ``import lora_fx``).  The modules holding them (``Linear4bit``,
``Linear8bitLt``) have their own rules in :mod:`lora_fx.rules.bnb`.

* ``Params4bit`` (``bnb-4bit``: nf4 or fp4, with or without double quantization): stores packed
  bytes, ``(out·in/2, 1)`` uint8; the logical shape and the dtype the weight was quantized from
  are in ``quant_state.shape`` / ``quant_state.dtype``.  Dequantized exactly by
  ``bitsandbytes.functional.dequantize_4bit``.  On CPUs with AVX512-BF16 bitsandbytes repacks a
  ``Linear4bit``'s weight *in place* the first time it runs in eval mode without gradients
  (``quant_state.packing_format_for_cpu``); :meth:`Bnb4bitKind.dequantize` undoes that layout on a
  copy, and lora_fx's own modules are kept from doing it (:mod:`lora_fx.rules.bnb`).
* ``Int8Params`` (``bnb-int8``, LLM.int8 with ``has_fp16_weights=False``): int8 codes ``(out, in)``
  and one float32 scale per row (``SCB``), ``W = codes · SCB / 127``.  bitsandbytes moves ``SCB``
  into the module's ``state`` at the first forward; lora_fx's modules keep it on the weight too.
  bitsandbytes keeps no record of the dtype it quantized from (it quantizes from float16), so the
  weight's dtype is taken to be float16, and ``lora_fx.fold`` folds it to the model's own float
  dtype (or ``dtype=``).
"""

from __future__ import annotations

import copy

from typing import Optional

import bitsandbytes
import bitsandbytes.functional as bnb_functional
import torch
import torch.nn.functional as F
from bitsandbytes.nn import Int8Params, Params4bit
from torch import Tensor

from . import WeightKind, register_weight_kind

__all__ = ["Bnb4bitKind", "Bnb8bitKind", "unpacked_4bit"]


def unpacked_4bit(w: Tensor):
    """``(data, quant_state)`` of a ``Params4bit`` in bitsandbytes' standard layout: the weight's own
    when it is, else a copy converted back from the CPU inference layout (``w`` is not modified)."""
    qs = w.quant_state
    if getattr(qs, "packing_format_for_cpu", False):
        return bnb_functional._convert_weight_packed_for_cpu_inverse(w.data.clone(), copy.deepcopy(qs))
    return w.data, qs


def _tensor_bytes(t) -> int:
    return t.untyped_storage().nbytes() if isinstance(t, Tensor) and t.numel() else 0


class Bnb4bitKind(WeightKind):
    """``bitsandbytes.nn.Params4bit`` (see the module docstring)."""

    name = "bnb-4bit"
    native_ops = frozenset({"linear"})

    def shape(self, w: Tensor) -> tuple[int, ...]:
        return tuple(w.quant_state.shape)

    def dtype(self, w: Tensor) -> torch.dtype:
        return w.quant_state.dtype

    def dequantize(self, w: Tensor) -> Tensor:
        data, qs = unpacked_4bit(w)
        return bnb_functional.dequantize_4bit(data, qs).to(qs.dtype)

    def linear(self, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
        # the module's kernel (its autograd keeps only the packed weight), x already in the compute dtype
        if getattr(w.quant_state, "packing_format_for_cpu", False):  # repacked in place by the user's module
            data, qs = unpacked_4bit(w)
            return F.linear(x, bnb_functional.dequantize_4bit(data, qs).to(x.dtype), bias)
        return bitsandbytes.matmul_4bit(x, w, bias=bias, quant_state=w.quant_state)

    def writable(self, w: Tensor) -> bool:
        return False

    def requantize(self, w: Tensor, value: Tensor) -> Tensor:
        qs = w.quant_state
        new = Params4bit(value.to(qs.dtype).contiguous().cpu(), requires_grad=False, blocksize=w.blocksize,
                         compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                         quant_storage=w.quant_storage)
        return new.to(w.device)  # bitsandbytes quantizes on the first device move

    def share(self, w: Tensor) -> Tensor:
        # a new Params4bit over the same packed bytes with its own copy of the (small) statistics:
        # bitsandbytes' CPU inference repack of the user's module rebinds their data and edits their
        # quant_state in place, and must not reach the adapted model
        return Params4bit(w.data, requires_grad=False, quant_state=copy.deepcopy(w.quant_state),
                          blocksize=w.blocksize, compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                          quant_storage=w.quant_storage, module=None, bnb_quantized=w.bnb_quantized)

    def nbytes(self, w: Tensor) -> int:
        n = _tensor_bytes(w.data)
        qs = w.quant_state
        if qs is not None:
            n += _tensor_bytes(qs.absmax) + _tensor_bytes(qs.code)
            if qs.state2 is not None:
                n += _tensor_bytes(qs.state2.absmax) + _tensor_bytes(qs.state2.code)
        return n


class Bnb8bitKind(WeightKind):
    """``bitsandbytes.nn.Int8Params`` (see the module docstring)."""

    name = "bnb-int8"
    native_ops = frozenset({"linear"})
    frozen_linear = True  # its function form (lora_fx.ops_quantized.bnb_linear) keeps no float copy either

    def linear(self, x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
        # bitsandbytes' training path (MatMul8bitFp): dequantize in the input's dtype, then F.linear
        return F.linear(x, self.dequantize(w).to(x.dtype), None if bias is None else bias.to(x.dtype))

    def dtype(self, w: Tensor) -> torch.dtype:
        return torch.float16 if w.dtype == torch.int8 else w.dtype

    def dtype_recorded(self, w: Tensor) -> bool:
        return w.dtype != torch.int8

    def module_linear(self, x: Tensor, w: Tensor, bias: Optional[Tensor], state, training: bool) -> Optional[Tensor]:
        # Linear8bitLt.forward: bitsandbytes.matmul (LLM.int8, the input quantized) except in training
        # on CPU / XPU, where it dequantizes (= linear); compiled, the dequantized form is traced
        if (w.dtype != torch.int8 or (training and x.device.type in ("cpu", "xpu"))
                or torch.compiler.is_compiling() or state.CB is None):
            return None
        state.is_training = training
        return bitsandbytes.matmul(x, w, bias=bias, state=state)

    def dequantize(self, w: Tensor) -> Tensor:
        if w.dtype != torch.int8:  # has_fp16_weights=True: not quantized
            return w
        if w.SCB is None:
            raise ValueError(
                "this Int8Params has no row scales (SCB): bitsandbytes moved them into its Linear8bitLt's "
                "state at the first forward. lora_fx keeps them on its own copies; dequantize "
                "bitsandbytes.functional.int8_vectorwise_dequant(w.data, module.state.SCB) yourself.")
        return bnb_functional.int8_vectorwise_dequant(w.data, w.SCB)

    def reason(self, w: Tensor):
        shape = self.shape(w)
        if len(shape) < 2:
            return f"it is {len(shape)}-D; LoRA adapts weights with at least 2 dimensions"
        return None

    def writable(self, w: Tensor) -> bool:
        return False

    def requantize(self, w: Tensor, value: Tensor) -> Tensor:
        new = Int8Params(value.to(torch.float16).contiguous().cpu(), requires_grad=False, has_fp16_weights=False)
        return new.to(w.device)  # quantized on the first device move

    def share(self, w: Tensor) -> Tensor:
        # a new Int8Params over the same codes: lora_fx's module puts the row scales on it
        return Int8Params(w.data, requires_grad=False, has_fp16_weights=w.has_fp16_weights, CB=w.CB, SCB=w.SCB)

    def nbytes(self, w: Tensor) -> int:
        return _tensor_bytes(w.data) + _tensor_bytes(w.SCB)


register_weight_kind(Params4bit, Bnb4bitKind())
register_weight_kind(Int8Params, Bnb8bitKind())
