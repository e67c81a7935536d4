"""Drop-in for loralib / LoRA-Torch: ``import lora_fx.nn as lora`` in place of ``import loralib as lora``
(or ``import loratorch as lora``).

The layer classes (:class:`Linear`, :class:`Embedding`, :class:`Conv1d`, :class:`Conv2d`,
:class:`Conv3d`, :class:`MergedLinear`, :class:`MultiheadAttention`) take loralib's arguments and
hold its parameter names and layouts, so existing code and checkpoints keep working; their
forwards call :mod:`lora_fx.ops`, the functions the ``lora_fx.transform`` pass inserts.
``mark_only_lora_as_trainable``, ``lora_state_dict`` and ``register_model_param_after_backward``
are the same functions as ``lora_fx``'s.
"""

from ..adapters.trainable import mark_only_lora_as_trainable, register_model_param_after_backward
from ..io.state_dict import lora_state_dict
from . import layout, rule
from .layers import (Conv1d, Conv2d, Conv3d, Embedding, Linear, LoRALayer, MergedLinear, MultiheadAttention,
                     merged_weight)

__all__ = [
    "LoRALayer", "Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "MergedLinear", "MultiheadAttention",
    "merged_weight", "mark_only_lora_as_trainable", "lora_state_dict", "register_model_param_after_backward",
    "layout",
]
