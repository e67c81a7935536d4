"""Old path of :mod:`lora_fx.recompute` (adapter-input recomputation at run time); kept so existing
imports work."""

from .recompute import PRODUCERS, _to, down, module_kind  # noqa: F401

__all__ = ["down", "PRODUCERS", "module_kind"]
