"""Old path of :mod:`lora_fx.adapters.init`; kept so existing imports work."""

from .adapters.init import dora_init_, pissa_init_  # noqa: F401

__all__ = ["pissa_init_", "dora_init_"]
