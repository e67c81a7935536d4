"""Old path of :mod:`lora_fx.io.loralib`; kept so existing imports work."""

from .io.loralib import load_loralib_state_dict, loralib_state_dict  # noqa: F401

__all__ = ["load_loralib_state_dict", "loralib_state_dict"]
