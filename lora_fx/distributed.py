"""Distributed training of adapted models with PyTorch's own engines (DDP, FSDP2, activation
checkpointing) and adapter-only checkpoints.

lora_fx needs no wrapper of its own: an adapted model is an ordinary ``nn.Module`` whose frozen
base parameters and trainable adapters are registered once, at :func:`lora_fx.transform` time,
and never replaced afterwards, so the parameter objects ``DistributedDataParallel`` or
``fully_shard`` capture stay the model's parameters.  Blocks (children of ``nn.ModuleList`` s, or
``transform(..., blocks=[...])``) are traced into their own ``GraphModule`` s that the parent
*calls*, so per-block hooks (FSDP2 unshard/reshard, activation checkpointing) fire.

Typical FSDP2 use (mirrors how ``torch.distributed.fsdp.fully_shard`` is applied to LLMs)::

    gm = lora_fx.transform(model, rank=16)
    lora_fx.distributed.checkpoint_blocks_(gm)       # optional: activation checkpointing per block
    lora_fx.distributed.fully_shard_blocks_(gm)      # fully_shard(block) for each block, then root
    ...                                              # train; frozen base gets no grads, no state
    sd = lora_fx.distributed.gather_lora_state_dict(gm)   # collective: call on every rank
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import fx, nn

from .errors import ConfigError
from .state import plain_name, require_adapted, unwrap as unwrap_model
from .io._files import Entry, Rollback, atomic_write_bytes, entry_problems, mismatch_error, plain_keys, safetensors_bytes
from .io.native import own_file
from .io.state_dict import lora_state_dict

__all__ = ["unwrap", "blocks", "fully_shard_blocks_", "checkpoint_blocks_", "gather_lora_state_dict",
           "load_full_lora_state_dict_", "save_gathered_lora_state"]


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` (``OptimizedModule``), ``DistributedDataParallel`` and
    ``DataParallel`` wrappers, else ``model`` itself (FSDP2 and composable checkpointing do not
    wrap); :func:`lora_fx.state.unwrap`."""
    return unwrap_model(model)


def blocks(gm: nn.Module, *, nested: bool = False) -> list[tuple[str, nn.Module]]:
    """The blocks of an adapted model, as ``(fully qualified name, module)``.

    Blocks are what ``transform`` traced separately and the parent graph calls: children of every
    ``nn.ModuleList`` and modules named by ``transform(..., blocks=[...])``.  In a model that kept
    its class (a Hugging Face model, say) they are the children of its ``nn.ModuleList`` s (the
    decoder layers), kept modules or regions.  These are the units to pass to ``fully_shard`` or
    to activation checkpointing.

    Args:
        gm: a module returned by :func:`lora_fx.transform` (or wrapped in DDP).
        nested: ``False`` (default): outermost blocks only, in call order. ``True``: every block,
            innermost first (the order in which nested ``fully_shard`` calls must be made).

    Returns:
        list of ``(name, GraphModule)``; the root is never included.

    Raises:
        NotAdaptedError: ``gm`` was not produced by :func:`lora_fx.transform`.
        ConfigError: ``gm`` has no blocks (no ``nn.ModuleList``; name them with ``blocks=``).
    """
    root = unwrap(gm)
    require_adapted(root, "blocks", root=True)
    if isinstance(root, fx.GraphModule):
        found = [(name, m) for name, m in root.named_modules() if name and isinstance(m, fx.GraphModule)]
    else:
        found = [(name, m) for parent, lst in root.named_modules() if isinstance(lst, nn.ModuleList)
                 for name, m in ((f"{parent}.{k}" if parent else k, c) for k, c in lst.named_children())]
    if not found:
        raise ConfigError(
            f"{type(root).__name__} has no blocks: lora_fx keeps children of nn.ModuleList as called "
            "submodules, and this model has none. Name the modules to shard with "
            "lora_fx.transform(model, ..., blocks=['encoder.layer*']) or shard the root only.")
    if nested:
        return list(reversed(found))
    outer = []
    for name, m in found:
        if not any(name.startswith(o + ".") for o, _ in outer):
            outer.append((name, m))
    return outer


def fully_shard_blocks_(gm: nn.Module, **fsdp_kwargs: Any) -> nn.Module:
    """FSDP2 the way it is applied to LLMs: ``fully_shard(block, **fsdp_kwargs)`` for every block
    (innermost first), then ``fully_shard(gm, **fsdp_kwargs)``; returns ``gm`` (whose class
    becomes an ``FSDPModule`` subclass, as ``fully_shard`` does).

    Frozen base weights and trainable adapters may share a block: FSDP2 shards each parameter on
    its own dim 0, so mixed ``requires_grad`` is fine; only adapters get gradients.

    Args:
        gm: a module returned by :func:`lora_fx.transform`, on the device to train on.
        **fsdp_kwargs: passed to ``torch.distributed.fsdp.fully_shard`` (``mesh``,
            ``reshard_after_forward``, ``mp_policy``, ...).

    Raises:
        NotAdaptedError, ConfigError: as :func:`blocks`.
        RuntimeError: from ``fully_shard`` (e.g. no default process group).
    """
    from torch.distributed.fsdp import fully_shard

    for _, block in blocks(gm, nested=True):
        fully_shard(block, **fsdp_kwargs)
    fully_shard(gm, **fsdp_kwargs)
    return gm


def checkpoint_blocks_(gm: nn.Module) -> nn.Module:
    """Activation checkpointing per outermost block with PyTorch's composable
    ``torch.distributed._composable.checkpoint`` (non-reentrant; hook-based, so module structure
    and state-dict keys do not change); returns ``gm``.  Apply before :func:`fully_shard_blocks_`.

    A Hugging Face model that kept its class checkpoints its own way instead:
    ``gm.activation_checkpointing_enable()`` (``gradient_checkpointing_enable()`` before
    transformers 5), non-reentrant, on its decoder layers, as the model's own training code expects.

    Block outputs are kept; activations inside each block are recomputed in backward, which gives
    the same gradients as without checkpointing.

    Raises:
        NotAdaptedError, ConfigError: as :func:`blocks`.
    """
    from torch.distributed._composable import checkpoint

    root = unwrap(gm)
    if not isinstance(root, fx.GraphModule) and getattr(root, "supports_gradient_checkpointing", False):
        require_adapted(root, "checkpoint_blocks_", root=True)
        enable = getattr(root, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            root.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return gm
    for _, block in blocks(gm):
        checkpoint(block)
    return gm


def gather_lora_state_dict(model: nn.Module, *, bias: str = "none", device: Optional[str] = "cpu",
                           rank0_only: bool = False) -> dict[str, torch.Tensor]:
    """Full (unsharded) adapter-only state dict of a DDP-wrapped, FSDP2-sharded or plain adapted
    model: :func:`lora_fx.lora_state_dict` with every ``DTensor`` all-gathered to a plain tensor.

    This is a collective under FSDP2: call it on every rank.  Keys have no ``module.`` prefix
    (DDP is unwrapped), so the result loads into a fresh, unsharded ``transform(model, ...)``
    with ``load_state_dict(sd, strict=False)`` or is saved with safetensors.

    Args:
        model: adapted module, possibly wrapped in DDP or sharded with ``fully_shard``.
        bias: as in :func:`lora_fx.lora_state_dict`.
        device: where to put the gathered tensors (``"cpu"`` by default; ``None`` keeps them).
        rank0_only: return ``{}`` on ranks other than 0 (after taking part in the gather).

    Returns:
        ``{key: Tensor}`` with adapter shapes ``lora_A: (rank, fan_in)``, ``lora_B: (fan_out,
        rank)``, detached, in the adapters' dtype.

    Raises:
        ConfigError: unknown ``bias`` mode.
    """
    from torch.distributed.tensor import DTensor

    keep = not (rank0_only and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0)
    out = {}
    for key, value in lora_state_dict(unwrap(model), bias=bias).items():
        if isinstance(value, DTensor):
            value = value.full_tensor()  # collective: every rank takes part
        if keep:
            value = value.detach()
            out[key] = value.to(device).clone() if device is not None else value.clone()
    return out


def load_full_lora_state_dict_(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Load a full (unsharded) adapter state dict, e.g. from :func:`gather_lora_state_dict` or a
    file of :func:`lora_fx.io.save_lora_state`, into a plain, compiled, DDP-wrapped or
    FSDP2-sharded adapted model; each rank keeps its own shard
    (``torch.distributed.checkpoint.state_dict.set_model_state_dict`` with
    ``full_state_dict=True``).  In place; returns ``model``.

    The contract of every loader (:mod:`lora_fx.io._files`): every adapter entry of the model
    (:func:`lora_fx.lora_state_dict`) must be given, with the same (global) shape and a dtype it
    casts to exactly, and nothing else but biases; all mismatches are listed at once and nothing
    is loaded if any.  Keys with ``_orig_mod.`` / ``module.`` parts load too.

    Raises:
        AdapterMismatchError: missing, unexpected, wrong-shape or wrong-dtype keys, inf/nan values.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    inner = unwrap_model(model)
    own = lora_state_dict(inner, bias="all")
    required = set(lora_state_dict(inner))
    given = plain_keys(state_dict, own)
    expected = {k: Entry(tuple(v.shape), v.dtype, required=k in required) for k, v in own.items()}
    problems = entry_problems(given, expected, unexpected_why=lambda k: "not an adapter or bias of the model")
    if problems:
        raise mismatch_error(f"adapter state does not fit {type(inner).__name__}", problems)
    given = {k: v.to(own[k].dtype) for k, v in given.items()}
    with torch.no_grad(), Rollback() as undo:
        for k in given:
            undo.tensor(own[k])
        if any(isinstance(p, DTensor) for p in inner.parameters()):
            set_model_state_dict(inner, given, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            names = {plain_name(k): k for k in inner.state_dict()}
            inner.load_state_dict({names[k]: v for k, v in given.items()}, strict=False)
    return model


def save_gathered_lora_state(model: nn.Module, path, *, bias: str = "none", metadata: dict | None = None,
                             buffers: bool = True):
    """Gather the adapter-only state of a (possibly sharded, compiled or DDP-wrapped) model and
    write it on rank 0 as :func:`lora_fx.io.save_lora_state` does (safetensors with checksums,
    atomic write; factors at their effective rank, each adapter's rank, alpha, mixing weight and
    enabled flag, the buffers training changed on rank 0 unless ``buffers=False``), so
    :func:`lora_fx.io.load_lora_state` reads it into a fresh, unsharded model.

    A collective: call it on every rank.  Returns the path on rank 0 (or without a process
    group), ``None`` on other ranks.

    Raises:
        ConfigError: unknown ``bias`` mode.
    """
    sd = gather_lora_state_dict(model, bias=bias, rank0_only=True)
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return None
    tensors, meta = own_file(model, sd, buffers=buffers, metadata=metadata)
    atomic_write_bytes(path, safetensors_bytes(tensors, meta))
    return Path(path)
