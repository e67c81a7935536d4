"""Freezing and adapter-only state (loralib's ``mark_only_lora_as_trainable`` / ``lora_state_dict``
names and semantics)."""

from __future__ import annotations

import torch
from torch import nn

from .adapter import ADAPTER_ATTR, LoraAdapter
from .errors import ConfigError

__all__ = ["mark_only_lora_as_trainable", "lora_state_dict", "adapter_parameters"]

_BIAS = ("none", "all", "lora_only")


def _check_bias(bias: str) -> None:
    if bias not in _BIAS:
        raise ConfigError(f"bias must be one of {_BIAS}, got {bias!r}")


def _is_lora_key(name: str) -> bool:
    return "lora_" in name.rsplit(".", 1)[-1] or ".lora_" in name


def adapter_parameters(model: nn.Module, *, active_only: bool = True) -> list[nn.Parameter]:
    """Adapter parameters of ``model`` (lora_fx adapters, plus any parameter whose name contains
    ``lora_`` as in loralib-style layers); with ``active_only``, disabled adapters are left out."""
    out, seen = [], set()
    disabled = set()
    for m in model.modules():
        if isinstance(m, LoraAdapter) and active_only and not m.enabled:
            disabled.update(id(p) for p in m.parameters())
    for name, p in model.named_parameters():
        if _is_lora_key(name) and id(p) not in disabled and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _adapted_owners(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules()
            if isinstance(m._modules.get(ADAPTER_ATTR), nn.ModuleDict) or hasattr(m, "lora_A")]


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Set ``requires_grad`` so that only (enabled) adapter parameters train; returns ``model``.

    Args:
        model: a module from :func:`lora_fx.transform` (or with loralib-style ``lora_`` layers).
        bias: ``"none"``; ``"all"``: every parameter named ``bias`` trains too; ``"lora_only"``:
            the biases of adapted modules only (loralib semantics).

    Raises:
        ConfigError: unknown ``bias`` mode.
    """
    _check_bias(bias)
    trainable = {id(p) for p in adapter_parameters(model)}
    if bias == "all":
        trainable |= {id(p) for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"}
    elif bias == "lora_only":
        trainable |= {id(m.bias) for m in _adapted_owners(model)
                      if isinstance(getattr(m, "bias", None), nn.Parameter)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return model


def lora_state_dict(model: nn.Module, bias: str = "none") -> dict[str, torch.Tensor]:
    """The adapter entries of ``model.state_dict()`` (keys containing ``lora_``), plus biases per
    ``bias`` (as in :func:`mark_only_lora_as_trainable`).  ``model.load_state_dict(sd,
    strict=False)`` restores them exactly.

    Raises:
        ConfigError: unknown ``bias`` mode.
    """
    _check_bias(bias)
    sd = model.state_dict()
    out = {k: v for k, v in sd.items() if _is_lora_key(k)}
    if bias == "all":
        out.update({k: v for k, v in sd.items() if k.rsplit(".", 1)[-1] == "bias"})
    elif bias == "lora_only":
        owners = {id(m) for m in _adapted_owners(model)}
        for name, m in model.named_modules():
            if id(m) in owners and isinstance(getattr(m, "bias", None), torch.Tensor):
                key = f"{name}.bias" if name else "bias"
                if key in sd:
                    out[key] = sd[key]
    return out
