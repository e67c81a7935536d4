"""Op-table entries for bitsandbytes' ``Linear4bit`` (nf4 / fp4, any compute dtype, with or without
double quantization) and ``Linear8bitLt`` (LLM.int8, ``has_fp16_weights=False``).  Imported by
:func:`lora_fx.rules.module_rule` the first time it sees a bitsandbytes module (never by
``import lora_fx``); their weights' kinds are in :mod:`lora_fx.weights.bnb`.

Both modules compute ``F.linear(x, dequantize(W), b)`` (in ``compute_dtype`` for ``Linear4bit``),
so an adapter is factored after the module call, ``module(x) + s·(x Aᵀ) Bᵀ``: the module's own
kernel runs on the packed weight and nothing weight-sized is kept.  Merged (DoRA,
``lowering="merge"``) they become :func:`lora_fx.ops_quantized.bnb_linear` on
``dequantize(W) + ΔW``.  Their forward branches on the input (``x.device.type == "cpu"``), so the
torch.fx front-end keeps them as leaves; a module captured on its own (the regions front-end
visits the projections of a Hugging Face attention layer one by one) is the graph
``bnb_linear(x, self.weight, self.bias, self.compute_dtype)`` (``ModuleRule.own_graph``), where
the adapter is a factored ``linear`` site as on ``F.linear``.

lora_fx's own copy of each module is prepared before adapting (``ModuleRule.prepare``; the user's
model is never touched):

* ``Linear4bit``: ``support_avx512bf16_for_cpu = False``.  Otherwise, on CPUs with AVX512-BF16,
  the first call in eval mode without gradients (an evaluation pass, ``generate()``) repacks the
  weight *in place* into an inference layout whose kernel has no backward: training afterwards
  raises, or, inside a model, runs with silently wrong gradients.  A weight the user's model had
  repacked already is converted back on the copy, with the bfloat16-rounded scales the repack left
  (a warning says so).  ``compute_dtype`` is fixed (None
  becomes the dtype the weight was quantized from, which bitsandbytes would adopt from the first
  input) and the bias is stored in it, so no forward casts a parameter in place (which would also
  break ``torch.compile`` graphs).
* ``Linear8bitLt``: the row scales ``SCB``, which bitsandbytes moves from the weight into the
  module's ``state`` at the first forward, stay on the weight too, so the weight alone dequantizes.

``fold`` turns an adapted module holding a folded float weight into an ``nn.Linear`` (the bias in
the weight's dtype); with ``requantize=True`` it stays a bitsandbytes module with a freshly
quantized weight.  In eval mode ``Linear8bitLt`` quantizes its input to int8 (its inference
kernel), so eval outputs differ from the dequantized-weight function by that rounding (train mode
on CPU is exact); the graph of a module captured on its own passes its ``state`` and ``training``
to :func:`~lora_fx.ops_quantized.bnb_linear`, which computes as the module's forward does.
"""

from __future__ import annotations

from typing import Optional

import torch
from bitsandbytes.nn import Linear4bit, Linear8bitLt, Params4bit
from torch import fx, nn

from ..ops_quantized import bnb_linear
from ..weights.bnb import unpacked_4bit
from .table import Factored, ModuleRule, _attr, _input, register_module_rule

__all__: list[str] = []  # entries only: importing this module registers them


def _factored(node, m, pname):
    return Factored.linear(_input(node)) if pname == "weight" else None


def _merged(graph, node, m, merged):
    bias = _attr(graph, node, "bias") if m.bias is not None else None
    compute = m.compute_dtype if isinstance(m, Linear4bit) else None
    return graph.call_function(bnb_linear, (_input(node), merged["weight"], bias, compute))


#: Said once per transform, naming the layers (``ModuleRule.prepare`` returns it).
_REPACKED = (
    "bitsandbytes had repacked these weights in place for CPU inference (a forward in eval mode without "
    "gradients, before transform), rounding their block scales to bfloat16 on the way; lora_fx converted its "
    "copies back to the training layout, with those rounded scales (the repacked modules compute with them "
    "too, about 1e-3 from the weights as first quantized, so the adapted model at B = 0 is that far from "
    "the first quantization). Adapt the model before evaluating it, or set support_avx512bf16_for_cpu = "
    "False on its Linear4bit modules.")


def _prepare_4bit(m: Linear4bit, path: str) -> Optional[str]:
    w = m.weight
    if not isinstance(w, Params4bit) or w.quant_state is None:
        return
    notice = None
    if getattr(w.quant_state, "packing_format_for_cpu", False):
        w.data, w.quant_state = unpacked_4bit(w)
        notice = _REPACKED
    m.support_avx512bf16_for_cpu = False
    w.module = m  # a deep copy's weight still points at the user's module
    m.quant_state = w.quant_state
    if m.compute_dtype is None:
        m.compute_dtype = w.quant_state.dtype
    m.compute_type_is_set = True
    if m.bias is not None and m.bias.dtype != m.compute_dtype:
        m.bias.data = m.bias.data.to(m.compute_dtype)
    return notice


def _prepare_8bit(m: Linear8bitLt, path: str = "") -> None:
    w = m.weight
    if w.dtype != torch.int8:  # has_fp16_weights=True, or not quantized yet
        return
    scb = w.SCB if w.SCB is not None else m.state.SCB
    m.state.CB, m.state.SCB = w.data, scb
    w.CB, w.SCB = None, scb  # the forward then never moves them again


def _own_graph(m: nn.Linear) -> fx.Graph:
    """The module's forward over its own attributes: ``bnb_linear(x, weight, bias, compute_dtype)``
    (the compute dtype read at run time), for when the module is captured on its own."""
    graph = fx.Graph()
    x = graph.placeholder("input")
    bias = graph.get_attr("bias") if m.bias is not None else None
    compute = graph.get_attr("compute_dtype") if isinstance(m, Linear4bit) else None
    args = (x, graph.get_attr("weight"), bias, compute)
    if isinstance(m, Linear8bitLt):  # its state and mode: LLM.int8 where the module's forward uses it
        args += (graph.get_attr("state"), graph.get_attr("training"))
    graph.output(graph.call_function(bnb_linear, args))
    return graph


def _plain_linear(m: nn.Linear) -> nn.Module:
    """The float layer a bitsandbytes linear holding a folded float weight becomes: an ``nn.Linear``,
    or the transformers ``Conv1D`` it was made from (transformers records ``source_cls`` and
    transposes GPT-2's ``(in, out)`` weight before quantizing), with the weight back in its layout."""
    w = m.weight
    source = getattr(m, "source_cls", None)
    if isinstance(source, type) and source.__name__ == "Conv1D" and source.__module__.startswith("transformers."):
        layer = source(m.out_features, m.in_features)
        layer.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
        if m.bias is None:
            layer.bias = None
        else:
            layer.bias = nn.Parameter(m.bias.detach().to(w.dtype), requires_grad=m.bias.requires_grad)
        layer.train(m.training)
        return layer
    lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = w if isinstance(w, nn.Parameter) else nn.Parameter(w, requires_grad=False)
    if m.bias is not None:
        lin.bias = nn.Parameter(m.bias.detach().to(w.dtype), requires_grad=m.bias.requires_grad)
    lin.train(m.training)
    return lin


def _after_fold_4bit(m: Linear4bit) -> Optional[nn.Module]:
    if isinstance(m.weight, Params4bit):  # requantized
        m.weight.module = m
        m.quant_state = m.weight.quant_state
        return None
    return _plain_linear(m)


def _after_fold_8bit(m: Linear8bitLt) -> Optional[nn.Module]:
    if m.weight.dtype == torch.int8:  # requantized
        _prepare_8bit(m)
        return None
    return _plain_linear(m)


for _cls, _prepare, _after in ((Linear4bit, _prepare_4bit, _after_fold_4bit),
                               (Linear8bitLt, _prepare_8bit, _after_fold_8bit)):
    register_module_rule(_cls, ModuleRule(
        kind=lambda m: "linear", weights=lambda m: ("weight",), merged_call=_merged, factored=_factored, leaf=True,
        prepare=_prepare, after_fold=_after, own_graph=_own_graph))
