"""Old path of :mod:`lora_fx.passes.match_recompute`; kept so existing imports work."""

from .match_recompute import remat_spec  # noqa: F401

__all__ = ["remat_spec"]
