"""The adapter-only state dict (loralib's ``lora_state_dict`` name and semantics)."""

from __future__ import annotations

import torch
from torch import nn

from ..state import adapter_owners, check_bias, is_bias_key, is_lora_key, plain_name, trainable_params, unwrap

__all__ = ["lora_state_dict"]


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The adapter entries of ``model.state_dict()`` (keys containing ``lora_``), the base
    parameters trained in full with an adapter (``transform(..., trainable=[...])``), plus biases
    per ``bias`` (as in :func:`lora_fx.mark_only_lora_as_trainable`, except that ``"lora_only"``
    saves only the biases of modules that hold adapters, as loralib does: an ``r=0`` LoRA layer's
    bias trains but is not saved).  ``model.load_state_dict(sd, strict=False)`` restores them
    exactly.

    Keys are the plain module's: a ``torch.compile`` d or DDP-wrapped model gives the keys of the
    module inside (no ``_orig_mod.`` / ``module.`` parts).

    Raises:
        ConfigError: unknown ``bias`` mode.
    """
    check_bias(bias)
    model = unwrap(model)
    sd = {plain_name(k): v for k, v in model.state_dict().items()}
    out = {k: v for k, v in sd.items() if is_lora_key(k)}
    out.update({k: sd[k] for k in trainable_params(model) if k in sd})
    if bias == "all":
        out.update({k: v for k, v in sd.items() if is_bias_key(k)})
    elif bias == "lora_only":
        owners = {id(m) for m in adapter_owners(model)}
        for name, m in model.named_modules():
            if id(m) in owners and isinstance(getattr(m, "bias", None), torch.Tensor):
                key = plain_name(f"{name}.bias" if name else "bias")
                if key in sd:
                    out[key] = sd[key]
    return out
