"""Helpers every adapter-file format shares: atomic writes and safetensors bytes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

import torch

from ..state import FILE_META

__all__ = ["atomic_write", "atomic_write_bytes", "safetensors_bytes"]


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
