"""Op-table entries for the graph ops of quantized bases (:mod:`lora_fx.ops_quantized`): both are
linear in their weight, so adapters on them are factored like ``F.linear``'s."""

from __future__ import annotations

from ..ops_quantized import bnb_linear, quantized_linear
from .functional import _linear_fn_factored
from .table import FunctionRule, register_function_rule

__all__: list[str] = []  # entries only: importing this module registers them

register_function_rule(quantized_linear, FunctionRule("linear", ((1, "weight"),), _linear_fn_factored))
register_function_rule(bnb_linear, FunctionRule("linear", ((1, "weight"),), _linear_fn_factored))
