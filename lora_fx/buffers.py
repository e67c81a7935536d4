"""Which persistent buffers training changed since :func:`lora_fx.transform` (BatchNorm running
statistics, a module's running average): a fingerprint of every buffer of the model is kept at
transform time (:data:`lora_fx.state.BUFFERS_ATTR`, a short digest, not a copy) and compared with
the adapted model's buffers when an adapter file is written (:mod:`lora_fx.io`)."""

from __future__ import annotations

import hashlib
from typing import Optional

import torch
from torch import nn

from .state import BUFFERS_ATTR, plain_name, unwrap

__all__ = ["fingerprint", "record_buffers_", "changed_buffers"]


def fingerprint(t: torch.Tensor) -> Optional[str]:
    """A short digest of ``t``'s dtype, shape and bytes (sha256, 32 hex digits), or None for a tensor
    whose bytes cannot be read here (meta, a distributed tensor)."""
    if t.device.type == "meta" or type(t) not in (torch.Tensor, nn.Parameter, nn.Buffer):
        return None
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes() if flat.dtype != torch.uint8 else flat.numpy().tobytes())
    return h.hexdigest()[:32]


def _persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """``{state-dict key: tensor}`` of ``module``'s persistent buffers, read from the modules
    themselves: ``state_dict()`` is not called, because some modules convert their weights in
    place when saved (bitsandbytes' CPU-repacked 4-bit layers) and add non-buffer entries."""
    out: dict[str, torch.Tensor] = {}
    for path, mod in module.named_modules(remove_duplicate=False):
        skip = mod._non_persistent_buffers_set
        for name, buf in mod._buffers.items():
            if buf is not None and name not in skip:
                out.setdefault(f"{path}.{name}" if path else name, buf)
    return out


def record_buffers_(root: nn.Module, source: nn.Module) -> nn.Module:
    """Record on ``root`` the :func:`fingerprint` of every persistent buffer of ``source`` (the
    user's model, whose keys ``root``'s state dict repeats) that ``root`` has; returns ``root``."""
    own = _persistent_buffers(root)
    prints = {k: fingerprint(t) for k, t in _persistent_buffers(source).items() if k in own}
    setattr(root, BUFFERS_ATTR, {k: v for k, v in prints.items() if v is not None})
    return root


def changed_buffers(root: nn.Module) -> list[str]:
    """State-dict keys of the persistent buffers whose values differ from those :func:`record_buffers_`
    saw at transform time (e.g. BatchNorm running statistics after training), in state-dict order."""
    root = unwrap(root)
    recorded = getattr(root, BUFFERS_ATTR, None) or {}
    return [plain_name(k) for k, t in _persistent_buffers(root).items()
            if plain_name(k) in recorded and fingerprint(t) not in (None, recorded[plain_name(k)])]
