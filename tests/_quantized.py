"""Quantized bases for the QLoRA tests: one builder per kind, and the *float twin* every check
compares against.

A :class:`QKind` quantizes a seeded 2-layer MLP ``in → hidden → in`` (non-square, GELU between, so
layer 1's adapter gradients pass through layer 2's base backward) the way users do it: torchao's
``quantize_`` / ``to_nf4``, bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` loaded from a float
``nn.Linear`` and moved to the CPU (which quantizes).

:func:`float_twin` builds the reference model *independently of lora_fx*: each quantized layer
becomes a :class:`DequantLinear` holding the weight as the library itself dequantizes it
(``get_original_weight()``, ``.dequantize()``, ``bitsandbytes.functional.dequantize_4bit``,
``int8_vectorwise_dequant``) and computing in the layer's compute dtype, so
``_reference.reference_call(twin, gm, ...)`` is ``F.linear(x, W_deq + s·B@A, b)`` per layer.
Call it before the quantized model runs (bitsandbytes moves state at the first forward).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["QKind", "KINDS", "WEIGHT_ONLY", "kind", "mlp", "float_twin", "DequantLinear", "dequantize_reference",
           "quiet_import", "saved_float_bytes"]

D_IN, D_HIDDEN = 128, 256  # numel 32768: divisible by NF4's 64·256 block, bnb's 64, int4's group 64


@contextlib.contextmanager
def _silenced():
    """torchao and bitsandbytes print warnings and log lines about optional kernels at import."""
    err, out = sys.stderr, sys.stdout
    sys.stderr = sys.stdout = io.StringIO()
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stderr, sys.stdout = err, out
        logging.disable(level)


def quiet_import(name: str):
    """``pytest.importorskip(name)`` without the library's import-time noise."""
    with _silenced():
        return pytest.importorskip(name)


def mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, D_HIDDEN), nn.GELU(), nn.Linear(D_HIDDEN, D_IN)).to(dtype)


@dataclass(frozen=True)
class QKind:
    """A quantized kind: ``make(dtype)`` returns the quantized MLP; ``lib`` is the library it needs."""

    name: str
    lib: str
    make: Callable[[torch.dtype], nn.Module]
    straight_through: bool = False  # the kernel quantizes activations too
    trains: bool = True  # the kernel has a backward (through our frozen-base op)

    def build(self, dtype: torch.dtype) -> nn.Module:
        quiet_import(self.lib)
        with _silenced():
            return self.make(dtype)


def _torchao(config_fn):
    def make(dtype):
        from torchao.quantization import quantize_

        m = mlp(dtype)
        quantize_(m, config_fn())
        return m
    return make


def _nf4(dtype):
    from torchao.quantization import to_nf4

    m = mlp(dtype)
    for i in (0, 2):
        m[i].weight = nn.Parameter(to_nf4(m[i].weight.detach()), requires_grad=False)
    return m


def _bnb4(quant_type: str, double: bool):
    def make(dtype):
        import bitsandbytes as bnb

        m = mlp(dtype)
        for i in (0, 2):
            lin = m[i]
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compute_dtype=dtype, compress_statistics=double,
                                  quant_type=quant_type).to(dtype)  # quantized from the model's dtype
            q.load_state_dict(lin.state_dict())
            m[i] = q.to("cpu")  # quantizes
        return m
    return make


def _bnb8(dtype):
    import bitsandbytes as bnb

    m = mlp(dtype)
    for i in (0, 2):
        lin = m[i]
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False).to(dtype)
        q.load_state_dict(lin.state_dict())
        m[i] = q.to("cpu")  # quantizes (from float16)
    return m


def _ao(name):
    def config():
        import torchao.quantization as q

        if name == "int8":
            return q.Int8WeightOnlyConfig()
        if name == "int8-dynamic":
            return q.Int8DynamicActivationInt8WeightConfig()
        if name == "intx-int4":
            return q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerGroup(64))
        if name == "float8":
            return q.Float8WeightOnlyConfig()
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=64)
    return config


KINDS = {k.name: k for k in [
    QKind("torchao-nf4", "torchao", _nf4),
    QKind("torchao-int8", "torchao", _torchao(_ao("int8"))),
    QKind("torchao-intx-int4", "torchao", _torchao(_ao("intx-int4"))),
    QKind("torchao-float8", "torchao", _torchao(_ao("float8"))),
    QKind("torchao-int8-dynamic", "torchao", _torchao(_ao("int8-dynamic")), straight_through=True),
    QKind("torchao-int4-cpu", "torchao", _torchao(_ao("int4-cpu")), trains=False),
    QKind("bnb-nf4-dq", "bitsandbytes", _bnb4("nf4", True)),
    QKind("bnb-fp4", "bitsandbytes", _bnb4("fp4", False)),
    QKind("bnb-int8", "bitsandbytes", _bnb8),
]}
#: Kinds whose forward is F.linear on the dequantized weight and which train (exact references).
WEIGHT_ONLY = [n for n, k in KINDS.items() if k.trains and not k.straight_through]


def kind(name: str) -> QKind:
    return KINDS[name]


def dequantize_reference(module: nn.Module) -> tuple[torch.Tensor, Optional[torch.dtype], bool]:
    """``(W, compute dtype, bitsandbytes)`` of a quantized linear, by the library's own API (not
    lora_fx's); compute dtype None: the input's dtype."""
    w = module.weight
    cls = type(w).__name__
    if cls == "NF4Tensor":
        return w.get_original_weight(), None, False
    if cls == "Int4OpaqueTensor":  # no dequantize in torchao: its kernel applied to the identity
        return F.linear(torch.eye(w.shape[1], dtype=w.dtype), w).t().contiguous(), None, False
    if hasattr(w, "dequantize") and cls not in ("Params4bit", "Int8Params"):
        return w.dequantize(), None, False
    import bitsandbytes.functional as bF

    if cls == "Params4bit":
        return bF.dequantize_4bit(w.data, w.quant_state).to(w.quant_state.dtype), module.compute_dtype, True
    if cls == "Int8Params":
        scb = w.SCB if w.SCB is not None else module.state.SCB
        return bF.int8_vectorwise_dequant(w.data, scb), None, True
    return w.detach(), None, False


class DequantLinear(nn.Linear):
    """What a quantized linear computes, on a float ``W``: torchao's, ``F.linear(x, W.to(x.dtype),
    b)``; bitsandbytes' (``bnb=True``), the same in ``compute_dtype`` (None: ``x``'s) and the result
    cast back to ``x``'s dtype."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], compute_dtype: Optional[torch.dtype],
                 bnb: bool = False):
        super().__init__(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.compute_dtype, self.bnb = compute_dtype, bnb

    def forward(self, x):
        cd = self.compute_dtype or x.dtype
        b = None if self.bias is None else self.bias.to(cd)
        out = F.linear(x.to(cd), self.weight.to(cd), b)
        return out.to(x.dtype) if self.bnb else out


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every quantized linear replaced by a :class:`DequantLinear` (the
    user's model is not touched)."""
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, nn.Linear) and type(mod.weight) not in (torch.Tensor, nn.Parameter):
            w, cd, is_bnb = dequantize_reference(mod)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent) if parent else twin, child, DequantLinear(w, mod.bias, cd, is_bnb))
    return twin


def saved_float_bytes(fn, min_bytes: int, model: Optional[nn.Module] = None) -> list[tuple[str, tuple, torch.dtype]]:
    """Run ``fn()`` and list the plain floating tensors of at least ``min_bytes`` that autograd saves
    for backward (a weight-sized dequantized copy would show here); with ``model``, views of its own
    parameters (a float layer's weight, saved as it is) are not listed."""
    found = []
    own = {p.untyped_storage().data_ptr() for p in model.parameters()
           if type(p) in (torch.Tensor, nn.Parameter)} if model is not None else set()

    def pack(t):
        if (type(t) in (torch.Tensor, nn.Parameter) and t.is_floating_point()
                and t.numel() * t.element_size() >= min_bytes and t.untyped_storage().data_ptr() not in own):
            found.append((type(t).__name__, tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return found
