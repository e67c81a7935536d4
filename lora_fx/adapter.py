"""Old path of :mod:`lora_fx.adapters.module` (the adapter module); kept so existing imports work."""

from .adapters.module import ADAPTER_ATTR, LoraAdapter, adapter_path  # noqa: F401

__all__ = ["LoraAdapter", "ADAPTER_ATTR", "adapter_path"]
