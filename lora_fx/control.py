"""Old path of :mod:`lora_fx.adapters.hotswap`; kept so existing imports work."""

from .adapters.hotswap import (disable_adapters, enable_adapters_, load_adapter_values_, reserve_rank_,  # noqa: F401
                                select_adapters, set_scale_)

__all__ = ["select_adapters", "set_scale_", "enable_adapters_", "disable_adapters", "load_adapter_values_", "reserve_rank_"]
