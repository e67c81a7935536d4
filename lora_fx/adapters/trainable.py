"""Which parameters train: only the adapters (loralib's ``mark_only_lora_as_trainable`` name and
semantics), and the adapter parameters themselves.  The adapter-only state dict is
:func:`lora_fx.io.state_dict.lora_state_dict`."""

from __future__ import annotations

from torch import nn

from ..state import (adapter_owners, check_bias, is_bias_key, is_lora_key, is_lora_layer, iter_adapters,
                     trainable_params, unwrap)
from .module import LoraAdapter

__all__ = ["mark_only_lora_as_trainable", "adapter_parameters", "train_adapters_only_",
           "register_model_param_after_backward"]


def _full(model: nn.Module, *, active_only: bool) -> set[int]:
    """Ids of the base parameters trained in full (``trainable=``) with the adapters (with
    ``active_only``: those that contribute now, in the active set and switched on)."""
    inner = unwrap(model)
    names = None if not active_only else {n for n, _, a in iter_adapters(inner) if a.contributes}
    return {id(inner.get_parameter(n)) for n in trainable_params(inner, names)}


def train_adapters_only_(root: nn.Module) -> nn.Module:
    """``requires_grad`` True for every parameter of every :class:`LoraAdapter` under ``root``
    (enabled or not) and for the base parameters trained in full with an adapter
    (``trainable=``), False for all other parameters: the state :func:`lora_fx.transform`
    returns.  Returns ``root``."""
    adapters = {id(p) for m in root.modules() if isinstance(m, LoraAdapter) for p in m.parameters()}
    adapters |= _full(root, active_only=False)
    for p in root.parameters():
        p.requires_grad_(id(p) in adapters)
    return root


def adapter_parameters(model: nn.Module, *, active_only: bool = True) -> list[nn.Parameter]:
    """Adapter parameters of ``model`` (lora_fx adapters, plus any parameter whose name contains
    ``lora_`` as in loralib-style layers), and the base parameters trained in full with an adapter
    (``transform(..., trainable=[...])``); with ``active_only``, those of adapters that do not
    contribute now (outside the active set, or switched off) are left out.  What an optimizer
    needs: ``torch.optim.AdamW(adapter_parameters(gm))``."""
    out, seen = [], set()
    disabled = set()
    for m in model.modules():
        if isinstance(m, LoraAdapter) and active_only and not m.contributes:
            disabled.update(id(p) for p in m.parameters())
    full = _full(model, active_only=active_only)
    for name, p in model.named_parameters():
        if (is_lora_key(name) or id(p) in full) and id(p) not in disabled and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def mark_only_lora_as_trainable(model: nn.Module, bias: str = "none") -> nn.Module:
    """Set ``requires_grad`` so that only the adapters that contribute now (in the active set and
    switched on), and the base parameters trained in full with such an adapter
    (``transform(..., trainable=[...])``), train; returns ``model``.

    Args:
        model: a module from :func:`lora_fx.transform` (or with loralib-style ``lora_`` layers).
        bias: ``"none"``; ``"all"``: every parameter whose name's last component contains
            ``bias`` trains too (``bias``, ``in_proj_bias``, ...); ``"lora_only"``: the ``bias`` of
            adapted modules and of hand-built LoRA layers (loralib's ``isinstance(m, LoRALayer)``
            rule, so a ``lora_fx.nn.Linear`` with ``r=0`` trains its bias as in loralib).

    Raises:
        ConfigError: unknown ``bias`` mode.
    """
    check_bias(bias)
    trainable = {id(p) for p in adapter_parameters(model)} | _full(model, active_only=True)
    if bias == "all":
        trainable |= {id(p) for n, p in model.named_parameters() if is_bias_key(n)}
    elif bias == "lora_only":
        owners = adapter_owners(model) + [m for m in model.modules() if is_lora_layer(m)]
        trainable |= {id(m.bias) for m in owners if isinstance(getattr(m, "bias", None), nn.Parameter)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    return model


def register_model_param_after_backward(model: nn.Module) -> nn.Module:
    """No-op kept for LoRA-Torch code (``lora.register_model_param_after_backward(model)``).

    LoRA-Torch replaces each adapted parameter by a plain tensor ``W.detach() + ΔW`` during the
    forward and must re-register the parameters after ``backward()``.  lora_fx never deletes or
    re-registers a parameter (merged weights are temporaries, :func:`lora_fx.ops.merge`), so there is
    nothing to restore.  Returns ``model`` unchanged.
    """
    return model
