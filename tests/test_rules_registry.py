"""Supporting a new op is one op-table entry: a custom function and a custom module, registered with
the public ``register_function_rule`` / ``register_module_rule``, are adapted exactly (outputs and
gradients against the functional reference) and fold, with no other change."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import fx, nn

import lora_fx
from lora_fx import ops
from lora_fx.rules import Factored, FunctionRule, ModuleRule

from _reference import check_matches_reference, randomize_
from _tolerance import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the example of the "Extending" docs page: a new op, one rule --------------------------------

def scaled_linear(x, weight, gain: float):
    """``gain · x Wᵀ``: linear in ``weight``."""
    return gain * F.linear(x, weight)


fx.wrap("scaled_linear")  # torch.fx keeps the call as one node


@ops.delta_op
def scaled_linear_delta(y, x, lora_A, lora_B, scaling, gain):
    """``y + gain · s·(x Aᵀ) Bᵀ``: the factored form of ``scaled_linear`` with ``W + s·B@A``."""
    return y + gain * F.linear(F.linear(x, lora_A) * scaling, lora_B)


lora_fx.register_function_rule(scaled_linear, FunctionRule(
    "scaled_linear", weight_slots=((1, "weight"),),
    factored=lambda node, slot, shape: Factored(scaled_linear_delta, node.args[0], (node.args[2],))
    if slot == 1 else None))


class ScaledLinear(nn.Module):
    """A leaf module computing ``gain · x Wᵀ``."""

    def __init__(self, n_in: int, n_out: int, gain: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.gain = gain

    def forward(self, x):
        return self.gain * (x @ self.weight.t())


lora_fx.register_module_rule(ScaledLinear, ModuleRule(
    kind=lambda m: "scaled_linear", weights=lambda m: ("weight",),
    factored=lambda node, m, pname: Factored(scaled_linear_delta, node.args[0], (m.gain,))))

# -------------------------------------------------------------------------------------------------


class FunctionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 7) / 3)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(scaled_linear(x, self.w, 0.5)))


class ModuleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = ScaledLinear(7, 6, gain=2.0)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def _check(model, gm, x, site, op):
    by_param = {s.param: s for s in lora_fx.sites(gm)}
    assert by_param[site].op == op and by_param[site].lowering == "factored"
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert scaled_linear_delta in calls and scaled_linear_delta in ops.DELTA_OPS
    randomize_(gm)
    out = check_matches_reference(model, gm, (x,))
    folded = lora_fx.fold(gm)  # the registered delta op is stripped like the built-in ones
    assert scaled_linear_delta not in [n.target for n in folded.graph.nodes]
    assert_close(folded(x), out.detach(), dtype=torch.float32)


def test_registered_function_rule_is_a_default_factored_site():
    torch.manual_seed(0)
    model, x = FunctionNet(), torch.randn(3, 5, 7)
    gm = lora_fx.transform(model, rank=2)
    _check(model, gm, x, "w", "scaled_linear")


def test_registered_module_rule_is_a_default_factored_site():
    torch.manual_seed(0)
    model, x = ModuleNet(), torch.randn(3, 5, 7)
    gm = lora_fx.transform(model, rank=2, leaf_modules=["proj"])
    _check(model, gm, x, "proj.weight", "scaled_linear")


def test_registered_rule_follows_the_merge_lowering_too():
    torch.manual_seed(0)
    model, x = FunctionNet(), torch.randn(3, 5, 7)
    gm = randomize_(lora_fx.transform(model, rank=2, lowering="merge"))
    assert {s.param: s.lowering for s in lora_fx.sites(gm)} == {"w": "merge", "head.weight": "merge"}
    check_matches_reference(model, gm, (x,))


def test_insert_lora_decides_nothing_by_op_kind():
    with open(os.path.join(ROOT, "passes", "insert_lora.py")) as f:
        src = f.read()
    for needle in ('startswith("conv")', "embedding_delta", "linear_delta", "conv_delta", "matmul_delta",
                   'c.op ==', 'c.op !='):
        assert needle not in src, needle


def test_self_registered_ops_tables():
    assert ops.LORA_OPS[:7] == [ops.merge, ops.dora_merge, ops.linear_delta, ops.matmul_delta, ops.embedding_delta,
                                ops.conv_delta, ops.module_call]
    assert ops.MERGE_OPS[:3] == [ops.merge, ops.dora_merge, ops.dequantized]
    assert {ops.linear_delta, ops.matmul_delta, ops.embedding_delta, ops.conv_delta} <= set(ops.DELTA_OPS)
    assert all(f in ops.LORA_OPS for f in ops.DELTA_OPS + ops.MERGE_OPS)
