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

from ..errors import AdapterFileError, AdapterMismatchError, LoraFxError
from ..state import FILE_META

__all__ = ["Saver", "Loader", "mismatch_error", "atomic_write", "atomic_write_bytes", "safetensors_bytes",
           "file_target", "dir_target", "file_source", "dir_source"]


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


def _file_above(path: Path) -> Path | None:
    """The first existing parent of ``path`` that is a file (so ``path`` cannot be created), or None."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def file_target(path: Union[str, os.PathLike], *, what: str, other: str) -> Path:
    """``Path(path)`` if a file can be written there.

    Args:
        what: the writer, for the message (``"save_lora_state"``).
        other: the writer of directories, for the fix (``"lora_fx.save_adapter(model, directory)"``).

    Raises:
        AdapterFileError: ``path`` is an existing directory, or a parent of it is a file.
    """
    p = Path(path)
    if p.is_dir():
        raise AdapterFileError(f"{what}() writes one file, but {str(p)!r} is an existing directory. Pass a file path "
                               f"such as {str(p / 'adapter.safetensors')!r}, or use {other} to write a directory.")
    blocker = _file_above(p)
    if blocker is not None:
        raise AdapterFileError(f"{what}() cannot create {str(p)!r}: {str(blocker)!r} is a file, not a directory. "
                               "Choose a path whose folders are folders.")
    return p


def dir_target(path: Union[str, os.PathLike], *, what: str, other: str) -> Path:
    """``Path(path)`` if a directory can be written there (it may exist).

    Raises:
        AdapterFileError: ``path`` is an existing file, or a parent of it is a file.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise AdapterFileError(f"{what}() writes a directory (PEFT's adapter_model.safetensors and "
                               f"adapter_config.json), but {str(p)!r} is an existing file. Pass a directory path such "
                               f"as {str(p.with_suffix(''))!r}, or use {other} to write one file.")
    blocker = _file_above(p)
    if blocker is not None:
        raise AdapterFileError(f"{what}() cannot create the directory {str(p)!r}: {str(blocker)!r} is a file. "
                               "Choose a path whose folders are folders.")
    return p


def file_source(path: Union[str, os.PathLike], *, what: str, other: str) -> Path:
    """``Path(path)`` if it is an existing file.

    Raises:
        AdapterFileError: ``path`` does not exist or is a directory (the fix names ``other``,
            the reader of directories).
    """
    p = Path(path)
    if p.is_dir():
        raise AdapterFileError(f"{what}() reads one file, but {str(p)!r} is a directory. Pass the .safetensors file "
                               f"inside it, or use {other} for a PEFT adapter directory.")
    if not p.exists():
        raise AdapterFileError(f"adapter file {str(p)!r} does not exist; pass the path that "
                               "lora_fx.io.save_lora_state wrote")
    return p


def dir_source(path: Union[str, os.PathLike], *, what: str, other: str) -> Path:
    """``Path(path)`` if it is an existing directory.

    Raises:
        AdapterFileError: ``path`` does not exist or is a file (the fix names ``other``, the
            reader of single files).
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise AdapterFileError(f"{what}() reads a PEFT adapter directory (adapter_config.json and "
                               f"adapter_model.safetensors), but {str(p)!r} is a file. Pass its directory "
                               f"{str(p.parent)!r} if it is PEFT's adapter_model.safetensors, or use {other} for a "
                               "lora_fx adapter file.")
    if not p.exists():
        raise AdapterFileError(f"adapter directory {str(p)!r} does not exist; pass the directory that "
                               "PEFT's save_pretrained or lora_fx.save_adapter wrote")
    return p


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
