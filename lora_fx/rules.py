"""The op table: for each weight-consuming op, where its weight is and how to lower a LoRA site.

A *site* is a (base parameter, consuming call) pair.  Two kinds of consuming calls exist in a
traced graph:

* a ``call_module`` node of a leaf module that owns the parameter (``nn.Linear``, ``nn.Conv2d``,
  ``nn.MultiheadAttention``, any opaque leaf): a :class:`ModuleRule`, looked up by module type;
* a ``get_attr`` node of the parameter feeding ``call_function`` nodes (``F.linear(x, self.w)``,
  ``x @ self.w``, ...): a :class:`FunctionRule`, looked up by the consuming function.

Each rule says which parameters are adapted by default, how to call the op with a merged weight
(*merge* lowering) and, when the op is linear in its weight and the factored form is exact, which
:mod:`lora_fx.ops` function computes ``op(x, W) + s·op_B(op_A(x))`` (*factored* lowering).  Adding
support for an op is adding one entry (:func:`register_module_rule`, :func:`register_function_rule`).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import ops

__all__ = [
    "Factored",
    "ModuleRule",
    "FunctionRule",
    "module_rule",
    "function_rule",
    "register_module_rule",
    "register_function_rule",
    "VIEW_OPS",
]


@dataclass(frozen=True)
class Factored:
    """How to emit a factored delta node: ``fn(y, x, lora_A, lora_B, scaling, *extra)``."""

    fn: Callable[..., torch.Tensor]
    x: Any  # the node (or value) feeding the adapter branch
    extra: tuple = ()


@dataclass(frozen=True)
class ModuleRule:
    """Rule for a leaf module type.

    Attributes:
        kind: op kind reported by :func:`lora_fx.sites` (e.g. ``"linear"``, ``"conv2d"``).
        weights: callable ``module -> tuple of parameter names`` adapted when ``targets`` is None.
        merged_call: callable ``(graph, node, module, merged: {param name: Node}) -> Node`` that
            emits a call equivalent to ``node`` with the merged weights; None means
            :func:`lora_fx.ops.module_call` (``torch.func.functional_call``).
        factored: callable ``(node, module, param name) -> Factored | None``.
        blocks: callable ``(module, param name) -> ((block name, rows), ...)``: the default
            fused layout of a weight whose output rows are blocks (MHA ``in_proj_weight``: q, k, v);
            ``()`` for a plain weight (see :mod:`lora_fx.fused`).
    """

    kind: Callable[[nn.Module], str]
    weights: Callable[[nn.Module], tuple[str, ...]] = lambda m: ()
    merged_call: Optional[Callable[..., fx.Node]] = None
    factored: Callable[..., Optional[Factored]] = lambda node, module, pname: None
    blocks: Callable[[nn.Module, str], tuple[tuple[str, int], ...]] = lambda module, pname: ()


@dataclass(frozen=True)
class FunctionRule:
    """Rule for a ``call_function`` target reading a parameter through a ``get_attr`` node.

    Attributes:
        kind: op kind reported by :func:`lora_fx.sites`.
        weight_slots: ``(arg index, kwarg name)`` pairs where a weight may stand (a default target
            only when the parameter stands in one of them).
        factored: callable ``(node, weight slot index, weight shape) -> Factored | None``.
        blocks: callable ``(node, weight slot index, weight shape) -> ((block name, rows), ...)``:
            default fused layout of the weight in that slot, ``()`` for none.
    """

    kind: str
    weight_slots: tuple[tuple[int, str], ...]
    factored: Callable[..., Optional[Factored]] = lambda node, slot, shape: None
    blocks: Callable[..., tuple[tuple[str, int], ...]] = lambda node, slot, shape: ()


_MODULE_RULES: list[tuple[type, ModuleRule]] = []
_FUNCTION_RULES: dict[Any, FunctionRule] = {}

#: Ops that only view or re-lay out a tensor: a parameter reaching a consumer through them is the
#: same site (analysis follows them; lowering merges at the parameter).
VIEW_OPS = {
    "t", "transpose", "permute", "view", "reshape", "contiguous", "unsqueeze", "squeeze", "flatten",
    "expand", "to", "type", "float", "half", "bfloat16", "chunk", "split", "narrow", "__getitem__",
    torch.t, torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.squeeze,
    torch.unsqueeze, torch.chunk, torch.split, torch.narrow, operator.getitem,
}


def register_module_rule(module_type: type, rule: ModuleRule) -> None:
    """Register (or override) the rule for ``module_type`` and its subclasses; later wins."""
    _MODULE_RULES.insert(0, (module_type, rule))


def register_function_rule(target: Any, rule: FunctionRule) -> None:
    """Register (or override) the rule for a ``call_function`` / ``call_method`` target."""
    _FUNCTION_RULES[target] = rule


def module_rule(module: nn.Module) -> ModuleRule:
    """The rule for ``module``: the first registered type it is an instance of, else the generic
    opaque-leaf rule (merge through ``torch.func.functional_call``; no default targets)."""
    for module_type, rule in _MODULE_RULES:
        if isinstance(module, module_type):
            return rule
    return _GENERIC_MODULE


def function_rule(target: Any) -> Optional[FunctionRule]:
    """The rule for a call target, or None (any other op: generic merge at the parameter)."""
    try:
        return _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _input(node: fx.Node):
    return _arg(node, 0, "input")


def _attr(graph: fx.Graph, node: fx.Node, name: str):
    return graph.get_attr(f"{node.target}.{name}")


_GENERIC_MODULE = ModuleRule(kind=lambda m: type(m).__name__.lower())

# ---------------------------------------------------------------------------------------------
# nn.Linear


def _linear_merged(graph, node, module, merged):
    bias = _attr(graph, node, "bias") if module.bias is not None else None
    return graph.call_function(F.linear, (_input(node), merged["weight"], bias))


register_module_rule(nn.Linear, ModuleRule(
    kind=lambda m: "linear",
    weights=lambda m: ("weight",),
    merged_call=_linear_merged,
    factored=lambda node, m, p: Factored(ops.linear_delta, _input(node)) if p == "weight" else None,
))

# ---------------------------------------------------------------------------------------------
# nn.Embedding


def _embedding_merged(graph, node, m, merged):
    return graph.call_function(F.embedding, (_input(node), merged["weight"], m.padding_idx, m.max_norm,
                                             m.norm_type, m.scale_grad_by_freq, m.sparse))


def _embedding_factored(node, m, pname):
    if pname != "weight" or m.max_norm is not None:
        return None  # max_norm renormalises W + ΔW (ops.embedding_delta handles padding_idx, scale_grad_by_freq)
    return Factored(ops.embedding_delta, _input(node), (m.padding_idx, m.scale_grad_by_freq))


register_module_rule(nn.Embedding, ModuleRule(
    kind=lambda m: "embedding",
    weights=lambda m: ("weight",),
    merged_call=_embedding_merged,
    factored=_embedding_factored,
))

# ---------------------------------------------------------------------------------------------
# nn.Conv1d/2d/3d (any padding_mode) and nn.ConvTranspose1d/2d/3d

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _conv_merged(graph, node, m, merged):
    nd = len(m.kernel_size)
    bias = _attr(graph, node, "bias") if m.bias is not None else None
    x = _input(node)
    padding = m.padding
    if m.padding_mode != "zeros":
        x = graph.call_function(F.pad, (x, tuple(m._reversed_padding_repeated_twice)),
                                {"mode": m.padding_mode})
        padding = (0,) * nd
    return graph.call_function(_CONV_FN[nd], (x, merged["weight"], bias, m.stride, padding, m.dilation,
                                              m.groups))


def _conv_factored(node, m, pname):
    if pname != "weight" or m.groups != 1 or m.padding_mode != "zeros":
        return None
    return Factored(ops.conv_delta, _input(node), (tuple(m.kernel_size), m.stride, m.padding, m.dilation))


register_module_rule(nn.modules.conv._ConvNd, ModuleRule(
    kind=lambda m: f"conv{len(m.kernel_size)}d",
    weights=lambda m: ("weight",),
    merged_call=_conv_merged,
    factored=_conv_factored,
))


def _conv_transpose_merged(graph, node, m, merged):
    if _arg(node, 1, "output_size") is not None:  # output padding depends on the call: keep forward
        return None
    nd = len(m.kernel_size)
    bias = _attr(graph, node, "bias") if m.bias is not None else None
    return graph.call_function(_CONV_T_FN[nd], (_input(node), merged["weight"], bias, m.stride, m.padding,
                                                m.output_padding, m.groups, m.dilation))


register_module_rule(nn.modules.conv._ConvTransposeNd, ModuleRule(
    kind=lambda m: f"conv_transpose{len(m.kernel_size)}d",
    weights=lambda m: ("weight",),
    merged_call=_conv_transpose_merged,
))

# ---------------------------------------------------------------------------------------------
# nn.MultiheadAttention: its forward reads in_proj_weight / q,k,v_proj_weight and
# out_proj.weight directly (never calling out_proj), so the whole leaf is called with substituted
# parameters through torch.func.functional_call (lora_fx.ops.module_call).  That runs the module's
# own forward on every path (batch_first, masks, add_bias_kv, add_zero_attn, need_weights, the
# eval/no_grad fused fast path with its `query is key` checks), so the adapted output is the
# output of an MHA whose weights are W + ΔW, by construction.  in_proj_weight is fused by default:
# q, k and v (embed_dim rows each) get their own rank-r factors, like q/k/v_proj_weight do.


def _mha_weights(m: nn.MultiheadAttention) -> tuple[str, ...]:
    proj = ("in_proj_weight",) if m.in_proj_weight is not None else (
        "q_proj_weight", "k_proj_weight", "v_proj_weight")
    return proj + ("out_proj.weight",)


def _mha_blocks(m: nn.MultiheadAttention, pname: str) -> tuple[tuple[str, int], ...]:
    if pname == "in_proj_weight" and m.in_proj_weight is not None:
        return (("q", m.embed_dim), ("k", m.embed_dim), ("v", m.embed_dim))
    return ()


register_module_rule(nn.MultiheadAttention, ModuleRule(kind=lambda m: "mha", weights=_mha_weights,
                                                       blocks=_mha_blocks))

# ---------------------------------------------------------------------------------------------
# torch.nn's transformer modules: fx cannot trace their forwards (they branch on tensor
# properties to pick a fast path), so they stay opaque leaves called through functional_call, and
# their default weights are those of the Linear / MHA modules inside them.

_COMPOSITE = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
              nn.TransformerDecoder, nn.Transformer)


def _inner(m: nn.Module):
    for name, sub in m.named_modules():
        rule = module_rule(sub)
        if name and rule is not _GENERIC_MODULE and not isinstance(sub, _COMPOSITE):
            yield name, sub, rule


def _composite_weights(m: nn.Module) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f"{name}.{w}" for name, sub, rule in _inner(m) for w in rule.weights(sub)))


def _composite_blocks(m: nn.Module, pname: str) -> tuple[tuple[str, int], ...]:
    owner, _, leaf = pname.rpartition(".")
    for name, sub, rule in _inner(m):
        if name == owner:
            return rule.blocks(sub, leaf)
    return ()


for _cls in _COMPOSITE:
    register_module_rule(_cls, ModuleRule(kind=lambda m: type(m).__name__.lower(), weights=_composite_weights,
                                          blocks=_composite_blocks))

# ---------------------------------------------------------------------------------------------
# Functional forms on a parameter (get_attr -> call_function)


def _linear_fn_factored(node, slot, shape):
    return Factored(ops.linear_delta, _input(node)) if slot == 1 else None


register_function_rule(F.linear, FunctionRule("linear", ((1, "weight"),), _linear_fn_factored))


def _embedding_fn_factored(node, slot, shape):
    if slot != 1 or _arg(node, 3, "max_norm") is not None:
        return None
    return Factored(ops.embedding_delta, _input(node),
                    (_arg(node, 2, "padding_idx"), bool(_arg(node, 5, "scale_grad_by_freq", False))))


register_function_rule(F.embedding, FunctionRule("embedding", ((1, "weight"),), _embedding_fn_factored))


def _conv_fn_factored(node, slot, shape):
    if slot != 1 or _arg(node, 6, "groups", 1) != 1:
        return None
    extra = (tuple(shape[2:]), _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0), _arg(node, 5, "dilation", 1))
    return Factored(ops.conv_delta, _input(node), extra)


for _nd, _fn in _CONV_FN.items():
    register_function_rule(_fn, FunctionRule(f"conv{_nd}d", ((1, "weight"),), _conv_fn_factored))
for _nd, _fn in _CONV_T_FN.items():
    register_function_rule(_fn, FunctionRule(f"conv_transpose{_nd}d", ((1, "weight"),)))


def _matmul_factored(node, slot, shape):
    if len(shape) != 2:
        return None
    other = node.args[1 - slot] if len(node.args) == 2 else None
    if other is None:
        return None
    return Factored(ops.matmul_delta, other, (slot == 0,))


for _target in (torch.matmul, operator.matmul, torch.mm, "matmul", "mm", "__matmul__"):
    register_function_rule(_target, FunctionRule("matmul", ((0, "input"), (1, "other")), _matmul_factored))


def _addmm_factored(node, slot, shape):
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
        return None
    return Factored(ops.matmul_delta, node.args[3 - slot], (slot == 1,))


register_function_rule(torch.addmm, FunctionRule("addmm", ((1, "mat1"), (2, "mat2")), _addmm_factored))


# F.multi_head_attention_forward(query, key, value, embed_dim, num_heads, in_proj_weight,
# in_proj_bias, bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, ...,
# q_proj_weight=18, k_proj_weight=19, v_proj_weight=20, ...): merged weights, in_proj fused q, k, v.


def _mha_fn_blocks(node, slot, shape):
    if slot != 5 or shape[0] % 3:
        return ()
    return (("q", shape[0] // 3), ("k", shape[0] // 3), ("v", shape[0] // 3))


register_function_rule(F.multi_head_attention_forward, FunctionRule(
    "mha", ((5, "in_proj_weight"), (11, "out_proj_weight"), (18, "q_proj_weight"), (19, "k_proj_weight"),
            (20, "v_proj_weight")), blocks=_mha_fn_blocks))

# ---------------------------------------------------------------------------------------------
# ATen-level forms (graphs from the torch.export front-end, lora_fx.passes.trace_export).  Same
# semantics as the functional forms above; the op's own argument layout decides which slot is
# the weight and its orientation (aten.addmm(bias, x, W) with W: (in, out), GPT-2's Conv1D).

_aten = torch.ops.aten

register_function_rule(_aten.linear.default, FunctionRule("linear", ((1, "weight"),), _linear_fn_factored))


def _aten_embedding_factored(node, slot, shape):
    # aten.embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False)
    if slot != 0 or bool(_arg(node, 4, "sparse", False)):
        return None
    pad = _arg(node, 2, "padding_idx", -1)  # ATen: -1 means none (F.embedding normalises negatives)
    return Factored(ops.embedding_delta, _arg(node, 1, "indices"),
                    (None if pad is None or pad < 0 else pad, bool(_arg(node, 3, "scale_grad_by_freq", False))))


register_function_rule(_aten.embedding.default, FunctionRule("embedding", ((0, "weight"),), _aten_embedding_factored))

for _nd in (1, 2, 3):
    for _overload in ("default", "padding"):
        register_function_rule(getattr(getattr(_aten, f"conv{_nd}d"), _overload),
                               FunctionRule(f"conv{_nd}d", ((1, "weight"),), _conv_fn_factored))
    for _overload in getattr(_aten, f"conv_transpose{_nd}d").overloads():
        register_function_rule(getattr(getattr(_aten, f"conv_transpose{_nd}d"), _overload),
                               FunctionRule(f"conv_transpose{_nd}d", ((1, "weight"),)))


def _aten_convolution_factored(node, slot, shape):
    # aten.convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups)
    if slot != 1 or _arg(node, 6, "transposed") or _arg(node, 8, "groups", 1) != 1:
        return None
    return Factored(ops.conv_delta, _input(node),
                    (tuple(shape[2:]), _arg(node, 3, "stride"), _arg(node, 4, "padding"), _arg(node, 5, "dilation")))


register_function_rule(_aten.convolution.default, FunctionRule("convolution", ((1, "weight"),),
                                                               _aten_convolution_factored))
register_function_rule(_aten.matmul.default, FunctionRule("matmul", ((0, "self"), (1, "other")), _matmul_factored))
register_function_rule(_aten.mm.default, FunctionRule("matmul", ((0, "self"), (1, "mat2")), _matmul_factored))
register_function_rule(_aten.addmm.default, FunctionRule("addmm", ((1, "mat1"), (2, "mat2")), _addmm_factored))

VIEW_OPS.update({
    _aten.t.default, _aten.transpose.int, _aten.permute.default, _aten.view.default, _aten.reshape.default,
    _aten._unsafe_view.default, _aten.unsqueeze.default, _aten.squeeze.default, _aten.squeeze.dim,
    _aten.squeeze.dims, _aten.flatten.using_ints, _aten.expand.default, _aten.alias.default,
    _aten.slice.Tensor, _aten.select.int, _aten.narrow.default, _aten.split.Tensor, _aten.chunk.default,
    _aten.contiguous.default, _aten.to.dtype, _aten.to.dtype_layout, _aten._to_copy.default,
    _aten.type_as.default,
})
