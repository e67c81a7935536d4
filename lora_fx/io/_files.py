"""What every adapter format shares: one signature shape, one mismatch error, atomic writes and
safetensors bytes.

Signature shape (:class:`Saver`, :class:`Loader`): the model first, then where the adapter is (a
file, a directory or a state dict), then keyword-only options.  A saver returns the path it wrote;
a loader returns the model it loaded into (or the adapted model it built), checks everything
before writing anything, and reports every problem at once with :func:`mismatch_error`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union

import torch
from torch import nn

from ..errors import AdapterMismatchError, LoraFxError
from ..state import FILE_META

__all__ = ["Saver", "Loader", "mismatch_error", "atomic_write", "atomic_write_bytes", "safetensors_bytes"]


class Saver(Protocol):
    """``save(model, path, *, **options) -> Path``: write the adapters of ``model`` to ``path``
    (atomically) and return it (e.g. :func:`lora_fx.io.save_lora_state`, :func:`lora_fx.save_adapter`)."""

    def __call__(self, model: nn.Module, path: Union[str, os.PathLike], /, **options: Any) -> Path: ...


class Loader(Protocol):
    """``load(model, source, *, **options) -> nn.Module``: load adapters from ``source`` (a path, a
    directory or a state dict) into ``model`` and return it, or raise :func:`mismatch_error`'s error
    with nothing changed (e.g. :func:`lora_fx.io.load_lora_state`, :func:`lora_fx.load_adapter`)."""

    def __call__(self, model: nn.Module, source: Any, /, **options: Any) -> nn.Module: ...


def mismatch_error(subject: str, problems: Sequence[str], *, hint: str = "", outcome: str = "nothing was loaded",
                   error: type[LoraFxError] = AdapterMismatchError) -> LoraFxError:
    """The one error for adapter state that does not fit: ``"<subject> (<n> problem(s); <outcome>):"``
    and one ``"  - <problem>"`` line per problem, then ``hint``.

    Args:
        subject: what did not fit what, e.g. ``"adapter file 'a.safetensors' does not fit MLP"``.
        problems: every mismatch (missing, unexpected, mis-shaped keys ...), each naming its key.
        hint: the fix, on its own line.
        outcome: what happened instead (nothing is ever half-loaded).
        error: the class to raise (:class:`~lora_fx.errors.AdapterMismatchError` by default).
    """
    message = f"{subject} ({len(problems)} problem(s); {outcome}):\n  - " + "\n  - ".join(problems)
    return error(message + (f"\n{hint}" if hint else ""))


def atomic_write(path: Union[str, os.PathLike], write: Callable[[str], None]) -> None:
    """Atomically create or replace ``path``: ``write(tmp)`` fills a temporary file in the same
    folder, which is then ``os.replace``-d onto ``path``.  A crash or error mid-write leaves any
    previous file intact and no temporary file behind.

    Raises:
        OSError: the folder is not writable, or ``write`` failed with it.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> None:
    """:func:`atomic_write` of ``data`` (flushed and fsync-ed), creating missing parent folders."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def safetensors_bytes(sd: dict[str, torch.Tensor], metadata: dict | None = None) -> bytes:
    """``sd`` serialised as safetensors with ``{"format": "lora_fx", **metadata}`` (non-string
    metadata values JSON-encoded)."""
    from safetensors.torch import save

    meta = {"format": FILE_META["format"], **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}}
    return save({k: v.contiguous() for k, v in sd.items()}, metadata=meta)
