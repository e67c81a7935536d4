"""lora_fx's own adapter files: one ``.safetensors`` file (safetensors only, never pickle; written
atomically; a sha256 per tensor).

A file holds, under the plain module's ``state_dict`` keys:

* every adapter's factors at its **effective rank**: a factor pair zero padded by
  :func:`lora_fx.reserve_rank_` (or by loading a lower rank) is saved without its zero padding;
  ``lora_magnitude`` for DoRA;
* the base parameters trained in full with an adapter (``transform(..., trainable=[...])``) and
  biases per ``bias``;
* the persistent base buffers training changed since ``transform`` (BatchNorm running statistics,
  EMAs), unless ``buffers=False``;
* in the metadata (``FILE_META["state"]``, JSON): each adapter's ``rank``, ``alpha``,
  ``use_rslora``, mixing weight, active-set membership and on/off switch, the configs, and which
  entries are buffers or trained parameters.

:func:`load_lora_state` restores all of it, so the loaded model computes what the saved one did.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional, Union

import torch
from torch import nn

from ..errors import AdapterFileError, LoraFxWarning, NotAdaptedError
from ..buffers import changed_buffers
from ..state import (FILE_META, adapter_modules, configs_of, is_bias_key, is_lora_key, plain_name, trainable_params,
                     unwrap)
from ._files import (ADAPTER_STATE, Entry, Rollback, adapter_state, atomic_write_bytes, entry_problems,
                     mismatch_error, plain_keys, read_safetensors, safetensors_bytes, set_adapter_state_)
from ._paths import file_source, file_target
from .state_dict import lora_state_dict

__all__ = ["save_lora_state", "load_lora_state", "own_file", "FILE_VERSION"]

#: Version of the metadata layout of lora_fx's own files (files without it load as before).
FILE_VERSION = 2
_FACTORS = ("lora_A", "lora_B", "lora_magnitude")


def _effective(a: nn.Module, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` without zero padding beyond the adapter's logical rank (exact: the padding adds
    ``0 @ 0`` to ``B @ A``); unchanged for fused adapters and non-zero padding."""
    r = int(a.rank)
    if getattr(a, "blocks", None) is not None or A.shape[0] <= r:
        return A, B
    if bool((A[r:] == 0).all()) and bool((B[:, r:] == 0).all()):
        return A[:r], B[:, :r]
    return A, B


def own_file(model: nn.Module, sd: Mapping[str, torch.Tensor], *, buffers: bool = True,
             metadata: Optional[dict] = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of an own file of ``model`` whose adapter state is ``sd`` (a
    :func:`~lora_fx.io.state_dict.lora_state_dict`, or its gathered copy under FSDP2): factors at
    their effective rank, changed buffers (``buffers``), the state metadata.  Warns
    (:class:`~lora_fx.errors.LoraFxWarning`) for changed buffers left out with ``buffers=False``."""
    model = unwrap(model)
    adapters = adapter_modules(model)
    tensors = {k: v.detach() for k, v in sd.items()}
    for path, (_, a) in adapters.items():
        ka, kb = f"{path}.lora_A", f"{path}.lora_B"
        if ka in tensors and kb in tensors:
            tensors[ka], tensors[kb] = _effective(a, tensors[ka], tensors[kb])
    changed = changed_buffers(model)
    if buffers:
        own = {plain_name(k): v for k, v in model.state_dict().items()}
        tensors.update({k: own[k].detach() for k in changed})
    elif changed:
        warnings.warn(f"buffers=False leaves out {len(changed)} buffer(s) that changed since transform: "
                      f"{changed[:8]}{' ...' if len(changed) > 8 else ''}; a model loaded from this file keeps its own "
                      "values of them", LoraFxWarning, stacklevel=3)
    state = {
        "version": FILE_VERSION,
        "adapters": {p: {"name": n, **adapter_state(a)} for p, (n, a) in adapters.items()},
        "buffers": changed if buffers else [],
        "trainable": trainable_params(model),
        "configs": {n: c.to_dict() for n, c in configs_of(model).items()},
    }
    return {k: v.contiguous().clone() for k, v in tensors.items()}, {**(metadata or {}), FILE_META["state"]: state}


def save_lora_state(model: nn.Module, path: Union[str, os.PathLike], *, bias: str = "none",
                    metadata: dict | None = None, buffers: bool = True) -> Path:
    """Save the adapter state of ``model`` to a ``.safetensors`` file (atomically): the entries of
    :func:`~lora_fx.io.state_dict.lora_state_dict` under their plain ``state_dict`` keys (also for
    a ``torch.compile`` d or DDP-wrapped model), each factor pair at its effective rank, the
    buffers training changed, and each adapter's rank, alpha, mixing weight, active-set membership
    and on/off switch (see the module docstring).  Tied tensors are saved once per key.

    Args:
        model: an adapted module (or a compiled / DDP wrapper of one).
        path: the file to write; its folder is created.
        bias: as :func:`~lora_fx.io.state_dict.lora_state_dict`.
        metadata: extra string-keyed metadata to store (lora_fx's own keys take precedence).
        buffers: also save the persistent base buffers that changed since ``transform``
            (``False``: leave them out, with a :class:`~lora_fx.errors.LoraFxWarning` naming them).

    Returns the path written.

    Raises:
        NotAdaptedError: ``model`` holds no adapter parameters (nothing would be saved).
        AdapterFileError: ``path`` is an existing directory, or below a file.
        OSError: the file cannot be written; any previous file at ``path`` is left intact.
    """
    file_target(path, what="save_lora_state", other="lora_fx.save_adapter(model, directory)")
    sd = lora_state_dict(model, bias=bias)
    if not any(is_lora_key(k) for k in sd):
        raise NotAdaptedError(f"save_lora_state(): {type(unwrap(model)).__name__} holds no adapter parameters, so the "
                              "file would be empty. Save the module returned by lora_fx.transform(model, ...).")
    tensors, meta = own_file(model, sd, buffers=buffers, metadata=metadata)
    atomic_write_bytes(path, safetensors_bytes(tensors, meta))
    return Path(path)


def _state(meta: dict, path) -> Optional[dict]:
    text = meta.get(FILE_META["state"])
    if text is None:
        return None
    try:
        state = json.loads(text)
    except ValueError:
        state = None
    if not isinstance(state, dict) or not isinstance(state.get("adapters"), dict):
        raise AdapterFileError(f"adapter file {str(path)!r}: its lora_fx state metadata is corrupt; re-save the adapter")
    return state


def load_lora_state(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a file written by :func:`save_lora_state` into ``model`` (in place; returns it).

    Factors of a lower rank than the adapter's capacity are zero padded and the adapter's rank,
    alpha, mixing weight, active-set membership and on/off switch are set from the file, so
    ``model`` computes what the saved model computed; saved buffers and fully trained parameters
    are restored.  Files of an older lora_fx (no state metadata) need the exact shapes and set
    values only.

    Every key is checked first (the contract of :mod:`lora_fx.io._files`): missing, unexpected,
    wrong-shape and wrong-dtype keys and inf/nan values are listed at once and nothing is loaded
    if any.  ``model`` may be ``torch.compile`` d or DDP-wrapped; keys with ``_orig_mod.`` /
    ``module.`` parts load too.

    Raises:
        AdapterFileError: missing, truncated or corrupt file (a tensor whose bytes do not match
            its checksum), or a directory.
        AdapterMismatchError: every mismatch, in one error.
    """
    target = unwrap(model)
    file_source(path, what="load_lora_state", other="lora_fx.load_adapter(model, directory)")
    tensors, meta = read_safetensors(path, hint="pass the path that lora_fx.io.save_lora_state wrote")
    state = _state(meta, path)
    own = {plain_name(k): v for k, v in target.state_dict(keep_vars=True).items()}
    tensors = plain_keys(tensors, own)
    params = {plain_name(n) for n, _ in target.named_parameters(remove_duplicate=False)}
    adapters = adapter_modules(target)
    expected: dict[str, Entry] = {}
    for path_, (_, a) in adapters.items():
        padded = state is not None and getattr(a, "blocks", None) is None
        for attr, axis in zip(_FACTORS, (0, 1, None)):
            key = f"{path_}.{attr}"
            if key in own:
                expected[key] = Entry(tuple(own[key].shape), own[key].dtype, rank_axis=axis if padded else None)
    required = set(lora_state_dict(target))
    listed = set(state.get("buffers", [])) | set(state.get("trainable", [])) if state else set()
    for k, v in own.items():
        if k not in expected and (k in required or is_bias_key(k) or k in listed):
            expected[k] = Entry(tuple(v.shape), v.dtype, required=k in required)

    def why(k: str) -> str:
        if k not in own:
            return "not in the model"
        kind = "parameter" if k in params else "buffer"
        return f"a base {kind} of the model that the file does not list as saved with the adapter: adapter files never " \
               "overwrite base weights"

    problems = entry_problems(tensors, expected, unexpected_why=why)
    groups: dict[int, list[str]] = {}
    for path_, (_, a) in adapters.items():
        groups.setdefault(id(a), []).append(path_)
    plan = []
    for paths in groups.values():
        a = adapters[paths[0]][1]
        present = [p for p in paths if f"{p}.lora_A" in tensors]
        for p in present[1:]:  # a tied adapter saved under each owner: one value
            for attr in _FACTORS:
                k0, k = f"{present[0]}.{attr}", f"{p}.{attr}"
                if k in tensors and k0 in tensors and not torch.equal(tensors[k], tensors[k0]):
                    problems.append(f"{k!r} and {k0!r} name one tied adapter but hold different values")
        if present and f"{present[0]}.lora_B" in tensors:
            va, vb = tensors[f"{present[0]}.lora_A"], tensors[f"{present[0]}.lora_B"]
            if getattr(a, "blocks", None) is None and va.ndim == 2 and vb.ndim == 2 and va.shape[0] != vb.shape[1]:
                problems.append(f"{present[0]!r}: lora_A has rank {va.shape[0]}, lora_B has rank {vb.shape[1]}")
            values = (state or {}).get("adapters", {}).get(present[0])
            if state is not None and not isinstance(values, dict):
                problems.append(f"{present[0]!r}: the file's state metadata lists no rank/alpha for this adapter")
            plan.append((a, present[0], values))
    if problems:
        raise mismatch_error(
            f"adapter file {str(path)!r} does not fit {type(target).__name__}", problems,
            hint="Load it into the same base model transformed with the same targets and ranks as the one "
            "that saved it (lora_fx.sites(model) lists this model's adapters).")
    with torch.no_grad(), Rollback() as undo:
        done = {f"{p}.{attr}" for ps in groups.values() for p in ps for attr in _FACTORS}
        for a, p, values in plan:
            for attr in _FACTORS:
                k = f"{p}.{attr}"
                if k not in tensors:
                    continue
                dst, src = getattr(a, attr), tensors[k].to(getattr(a, attr).dtype)
                undo.tensor(dst)
                if attr == "lora_A":
                    dst[: src.shape[0]].copy_(src)
                    dst[src.shape[0]:].zero_()
                elif attr == "lora_B":
                    dst[:, : src.shape[1]].copy_(src)
                    dst[:, src.shape[1]:].zero_()
                else:
                    dst.copy_(src)
            if values is not None:
                undo.attrs(a, ADAPTER_STATE)
                set_adapter_state_(a, values)
        for k, v in tensors.items():
            if k not in done:
                undo.tensor(own[k]).copy_(v.to(own[k].dtype))
    return model
