"""Op-table entries for ``torch.nn`` leaf modules (``call_module`` sites)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .table import (_GENERIC_MODULE, CONV_FN, CONV_T_FN, Factored, ModuleRule, _arg, _attr, _input, module_rule,
                    register_module_rule)

__all__: list[str] = []  # entries only: importing this module registers them

# ---------------------------------------------------------------------------------------------
# nn.Linear


def _linear_merged(graph, node, module, merged):
    bias = _attr(graph, node, "bias") if module.bias is not None else None
    return graph.call_function(F.linear, (_input(node), merged["weight"], bias))


register_module_rule(nn.Linear, ModuleRule(
    kind=lambda m: "linear",
    weights=lambda m: ("weight",),
    merged_call=_linear_merged,
    factored=lambda node, m, p: Factored.linear(_input(node)) if p == "weight" else None,
))

# ---------------------------------------------------------------------------------------------
# nn.Embedding


def _embedding_merged(graph, node, m, merged):
    return graph.call_function(F.embedding, (_input(node), merged["weight"], m.padding_idx, m.max_norm,
                                             m.norm_type, m.scale_grad_by_freq, m.sparse))


def _embedding_factored(node, m, pname):
    if pname != "weight" or m.max_norm is not None:
        return None  # max_norm renormalises W + ΔW (ops.embedding_delta handles padding_idx, scale_grad_by_freq)
    return Factored.embedding(_input(node), m.padding_idx, m.scale_grad_by_freq)


register_module_rule(nn.Embedding, ModuleRule(
    kind=lambda m: "embedding",
    weights=lambda m: ("weight",),
    merged_call=_embedding_merged,
    factored=_embedding_factored,
))

# ---------------------------------------------------------------------------------------------
# nn.Conv1d/2d/3d (any padding_mode) and nn.ConvTranspose1d/2d/3d

def _conv_merged(graph, node, m, merged):
    nd = len(m.kernel_size)
    bias = _attr(graph, node, "bias") if m.bias is not None else None
    x = _input(node)
    padding = m.padding
    if m.padding_mode != "zeros":
        x = graph.call_function(F.pad, (x, tuple(m._reversed_padding_repeated_twice)),
                                {"mode": m.padding_mode})
        padding = (0,) * nd
    return graph.call_function(CONV_FN[nd], (x, merged["weight"], bias, m.stride, padding, m.dilation,
                                              m.groups))


def _conv_factored(node, m, pname):
    if pname != "weight" or m.groups != 1 or m.padding_mode != "zeros":
        return None
    return Factored.conv(_input(node), m.kernel_size, m.stride, m.padding, m.dilation)


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
    return graph.call_function(CONV_T_FN[nd], (_input(node), merged["weight"], bias, m.stride, m.padding,
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
