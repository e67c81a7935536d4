"""How the ``lora_fx.transform`` pass treats :mod:`lora_fx.nn` layers (one op-table entry).

A layer with ``r == 0`` is its ``torch.nn`` base class for the pass.  A layer carrying its own
LoRA factors is not a default target (``transform`` would silently stack a second adapter); when
named in ``targets`` it is lowered factored (``layer(x) + s·...``) or merged through
:func:`lora_fx.ops.module_call`, which runs the layer's own forward with the merged weight, so
both updates apply.
"""

from __future__ import annotations

from .. import rules
from .layers import LoRALayer

__all__ = ["LORA_LAYER_RULE"]


def _has_lora(m) -> bool:
    return any("lora_" in n for n, _ in m.named_parameters(recurse=False))


def _base(m) -> rules.ModuleRule:
    """The rule of the layer's ``torch.nn`` base class (the one it would get without this rule)."""
    return rules.module_rule(m, skip=LORA_LAYER_RULE)


def _merged_call(graph, node, m, merged):
    base = _base(m)
    if _has_lora(m) or base.merged_call is None:
        return None  # module_call: the layer's own forward with the merged weight
    return base.merged_call(graph, node, m, merged)


LORA_LAYER_RULE = rules.ModuleRule(
    kind=lambda m: _base(m).kind(m),
    weights=lambda m: () if _has_lora(m) else _base(m).weights(m),
    merged_call=_merged_call,
    factored=lambda node, m, pname: _base(m).factored(node, m, pname),
)

rules.register_module_rule(LoRALayer, LORA_LAYER_RULE)
