"""The op table: for each weight-consuming op, where its weight is and every lowering decision.

A *site* is a (base parameter, consuming call) pair.  Two kinds of consuming calls exist in a
traced graph:

* a ``call_module`` node of a leaf module that owns the parameter (``nn.Linear``, ``nn.Conv2d``,
  ``nn.MultiheadAttention``, any opaque leaf): a :class:`ModuleRule`, looked up by module type;
* a ``get_attr`` node of the parameter feeding ``call_function`` nodes (``F.linear(x, self.w)``,
  ``x @ self.w``, ...): a :class:`FunctionRule`, looked up by the consuming function.

Each rule says which parameters are adapted by default, how to call the op with a merged weight
(*merge* lowering) and, when the op is linear in its weight and the factored form is exact, a
:class:`Factored` record: which :mod:`lora_fx.ops` delta computes ``op(x, W) + s·op_B(op_A(x))``
(*factored* lowering) and that op's policy: whether LoRA dropout applies to its input, whether
its input may be recomputed in backward, whether it takes a fused (per-block) adapter, and when
it is cheaper than merging.  :data:`MERGE` is the policy of every merge-lowered site and
:func:`choose_lowering` the one decision between the two.  Adding support for an op is adding one
entry (:func:`register_module_rule`, :func:`register_function_rule`); the passes never test op kinds.

Layout: :mod:`.table` (the records, the registry and the lowering policy), :mod:`.modules`
(``torch.nn`` leaf modules), :mod:`.functional` (``torch.nn.functional`` / ``torch`` calls and
their ATen forms), :mod:`.quantized` (the ops of quantized bases) and, loaded the first time a
module of that library is seen (:data:`RULE_BACKENDS`), :mod:`.bnb` (bitsandbytes' linears).
"""

from .table import (MERGE, RULE_BACKENDS, VIEW_OPS, Factored, FunctionRule, Merged, ModuleRule, choose_lowering,
                    function_rule, module_rule, register_function_rule, register_module_rule)
from . import functional, modules, quantized  # noqa: F401,E402  (the built-in entries register themselves)

__all__ = [
    "Factored",
    "Merged",
    "MERGE",
    "ModuleRule",
    "FunctionRule",
    "module_rule",
    "function_rule",
    "register_module_rule",
    "register_function_rule",
    "choose_lowering",
    "VIEW_OPS",
    "RULE_BACKENDS",
]
