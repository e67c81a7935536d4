"""Adapters: the adapter module (:mod:`.module`), their lifecycle on an adapted model (:mod:`.lifecycle`:
add, delete, activate, mix), hot-swap controls (:mod:`.hotswap`), weight-dependent initialisation
(:mod:`.init`) and which parameters train (:mod:`.trainable`).

The lifecycle API is re-exported here, so ``lora_fx.adapters.add_adapter`` and friends keep working.
"""

from .module import LoraAdapter
from .lifecycle import (active_adapters, adapter_names, add_adapter, delete_adapter, disable_adapters,
                        named_adapters, set_active_adapters, set_adapter_weights)

__all__ = [
    "LoraAdapter",
    "add_adapter",
    "adapter_names",
    "active_adapters",
    "set_active_adapters",
    "set_adapter_weights",
    "disable_adapters",
    "delete_adapter",
    "named_adapters",
]
