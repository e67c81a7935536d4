"""Op-table entries for functional forms on a parameter (``get_attr`` → ``call_function``): the
``torch.nn.functional`` / ``torch`` forms of the torch.fx front-end and the ATen forms of the
torch.export front-end."""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from .table import CONV_FN, CONV_T_FN, Factored, FunctionRule, _arg, _input, register_function_rule

__all__: list[str] = []  # entries only: importing this module registers them

# ---------------------------------------------------------------------------------------------
# Functional forms on a parameter (get_attr -> call_function)


def _linear_fn_factored(node, slot, shape):
    return Factored.linear(_input(node)) if slot == 1 else None


register_function_rule(F.linear, FunctionRule("linear", ((1, "weight"),), _linear_fn_factored))


def _embedding_fn_factored(node, slot, shape):
    if slot != 1 or _arg(node, 3, "max_norm") is not None:
        return None
    return Factored.embedding(_input(node), _arg(node, 2, "padding_idx"), bool(_arg(node, 5, "scale_grad_by_freq", False)))


register_function_rule(F.embedding, FunctionRule("embedding", ((1, "weight"),), _embedding_fn_factored))


def _conv_fn_factored(node, slot, shape):
    if slot != 1 or _arg(node, 6, "groups", 1) != 1:
        return None
    extra = (tuple(shape[2:]), _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0), _arg(node, 5, "dilation", 1))
    return Factored.conv(_input(node), *extra)


for _nd, _fn in CONV_FN.items():
    register_function_rule(_fn, FunctionRule(f"conv{_nd}d", ((1, "weight"),), _conv_fn_factored))
for _nd, _fn in CONV_T_FN.items():
    register_function_rule(_fn, FunctionRule(f"conv_transpose{_nd}d", ((1, "weight"),)))


def _matmul_factored(node, slot, shape):
    if len(shape) != 2:
        return None
    other = node.args[1 - slot] if len(node.args) == 2 else None
    if other is None:
        return None
    return Factored.matmul(other, slot == 0)


for _target in (torch.matmul, operator.matmul, torch.mm, "matmul", "mm", "__matmul__"):
    register_function_rule(_target, FunctionRule("matmul", ((0, "input"), (1, "other")), _matmul_factored))


def _addmm_factored(node, slot, shape):
    if node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
        return None
    return Factored.matmul(node.args[3 - slot], slot == 1)


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
    return Factored.embedding(_arg(node, 1, "indices"), None if pad is None or pad < 0 else pad,
                              bool(_arg(node, 3, "scale_grad_by_freq", False)))


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
    return Factored.conv(_input(node), shape[2:], _arg(node, 3, "stride"), _arg(node, 4, "padding"), _arg(node, 5, "dilation"))


register_function_rule(_aten.convolution.default, FunctionRule("convolution", ((1, "weight"),),
                                                               _aten_convolution_factored))
register_function_rule(_aten.matmul.default, FunctionRule("matmul", ((0, "self"), (1, "other")), _matmul_factored))
register_function_rule(_aten.mm.default, FunctionRule("matmul", ((0, "self"), (1, "mat2")), _matmul_factored))
register_function_rule(_aten.addmm.default, FunctionRule("addmm", ((1, "mat1"), (2, "mat2")), _addmm_factored))
