"""Where adapter files and directories go: each writer and reader checks its path first, so a
file where a directory is expected (or the reverse, or a file standing where a folder must be)
is an :class:`~lora_fx.errors.AdapterFileError` naming the path and the fix, never a bare
``FileExistsError`` / ``NotADirectoryError`` from the OS."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from ..errors import AdapterFileError

__all__ = ["file_target", "dir_target", "file_source", "dir_source"]


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
