"""Old path of :mod:`lora_fx.adapters.trainable` and :mod:`lora_fx.io.state_dict`; kept so existing
imports work."""

from .adapters.trainable import (adapter_parameters, mark_only_lora_as_trainable,  # noqa: F401
                                 register_model_param_after_backward)
from .io.state_dict import lora_state_dict  # noqa: F401

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict", "adapter_parameters", "register_model_param_after_backward"]
