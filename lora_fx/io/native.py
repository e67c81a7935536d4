"""lora_fx's own adapter files: one ``.safetensors`` file of :func:`~lora_fx.io.state_dict.lora_state_dict`
(safetensors only, never pickle; written atomically)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import torch
from torch import nn

from ..errors import AdapterFileError, NotAdaptedError
from ._files import atomic_write_bytes, file_source, file_target, mismatch_error, safetensors_bytes
from ..state import is_lora_key
from .state_dict import lora_state_dict

__all__ = ["save_lora_state", "load_lora_state"]


def save_lora_state(model: nn.Module, path: Union[str, os.PathLike], *, bias: str = "none",
                    metadata: dict | None = None) -> Path:
    """Save :func:`~lora_fx.io.state_dict.lora_state_dict` of ``model`` to a ``.safetensors`` file
    (atomically).  Keys are ``model.state_dict()`` keys; tied tensors are saved once per key.

    Returns the path written.

    Raises:
        NotAdaptedError: ``model`` holds no adapter parameters (nothing would be saved).
        AdapterFileError: ``path`` is an existing directory, or below a file.
        OSError: the file cannot be written; any previous file at ``path`` is left intact.
    """
    file_target(path, what="save_lora_state", other="lora_fx.save_adapter(model, directory)")
    sd = {k: v.detach().contiguous().clone() for k, v in lora_state_dict(model, bias=bias).items()}
    if not any(is_lora_key(k) for k in sd):
        raise NotAdaptedError(f"save_lora_state(): {type(model).__name__} holds no adapter parameters, so the file "
                              "would be empty. Save the module returned by lora_fx.transform(model, ...).")
    atomic_write_bytes(path, safetensors_bytes(sd, metadata))
    return Path(path)


def load_lora_state(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a file written by :func:`save_lora_state` into ``model`` (in place; returns it).

    Every key must exist in ``model.state_dict()`` with the same shape; all mismatches are listed
    at once and nothing is loaded if any.

    Raises:
        AdapterFileError: missing, truncated or corrupt file, or a directory.
        AdapterMismatchError: unexpected keys, missing adapter keys or shape mismatches.
    """
    from safetensors.torch import load

    file_source(path, what="load_lora_state", other="lora_fx.load_adapter(model, directory)")
    try:
        data = Path(path).read_bytes()
        sd = load(data)
    except FileNotFoundError as exc:
        raise AdapterFileError(f"adapter file {str(path)!r} does not exist; pass the path that "
                               "lora_fx.io.save_lora_state wrote") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
        raise AdapterFileError(
            f"adapter file {str(path)!r} is truncated or not a safetensors file ({type(exc).__name__}: {exc}). "
            "lora_fx reads only .safetensors files written by lora_fx.io.save_lora_state (it never unpickles); "
            "copy the file again or re-save the adapter. The model was not changed.") from exc
    own = model.state_dict()
    expected = set(lora_state_dict(model))
    problems = [f"unexpected key {k!r} (not in the model)" for k in sorted(set(sd) - set(own))]
    problems += [f"key {k!r} is a base weight of the model, not an adapter or bias entry (adapter files never "
                 "overwrite base weights)" for k in sorted(set(sd) & set(own) - expected)
                 if k.rsplit(".", 1)[-1] != "bias"]
    problems += [f"{k!r}: {v.dtype} is not a floating-point adapter tensor" for k, v in sorted(sd.items())
                 if not v.is_floating_point()]
    problems += [f"{k!r} holds inf/nan values" for k, v in sorted(sd.items())
                 if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    problems += [f"missing key {k!r}" for k in sorted(expected - set(sd))]
    problems += [f"{k!r}: file has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}"
                 for k, v in sorted(sd.items()) if k in own and own[k].shape != v.shape]
    if problems:
        raise mismatch_error(
            f"adapter file {str(path)!r} does not fit {type(model).__name__}", problems,
            hint="Load it into the same base model transformed with the same targets and ranks as the one "
            "that saved it (lora_fx.sites(model) lists this model's adapters).")
    model.load_state_dict(sd, strict=False)
    return model
