"""Adapter files: lora_fx's own format (:mod:`.native`), HF PEFT's (:mod:`.peft`), loralib / LoRA-Torch
state dicts (:mod:`.loralib`), the adapter-only state dict (:mod:`.state_dict`) and the helpers they
share (:mod:`._files`).

``lora_fx.io.save_lora_state`` / ``load_lora_state`` and the file helpers are re-exported here.
"""

from ._files import atomic_write, atomic_write_bytes, safetensors_bytes
from .native import load_lora_state, save_lora_state
from .state_dict import lora_state_dict

__all__ = ["save_lora_state", "load_lora_state", "lora_state_dict", "atomic_write", "atomic_write_bytes",
           "safetensors_bytes"]
