"""Old path of :mod:`lora_fx.nn.rule`; kept so existing imports work."""

from .rule import LORA_LAYER_RULE  # noqa: F401

__all__ = ["LORA_LAYER_RULE"]
