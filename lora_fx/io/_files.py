"""What every adapter format shares: one signature shape, one contract for the entries a loader
accepts, one mismatch error, all-or-nothing writes, atomic files and checksummed safetensors.

Signature shape (:class:`Saver`, :class:`Loader`): the model first, then where the adapter is (a
file, a directory or a state dict), then keyword-only options.  A saver returns the path it wrote;
a loader returns the model it loaded into (or the adapted model it built).

The loader contract, the same for every format:

* the given entries are compared with what the model expects (:class:`Entry`); every **missing**,
  **unexpected**, **wrong-shape** and **wrong-dtype** key (a cast that would change a value, or a
  non-floating-point tensor for a floating-point entry) and every inf/nan is collected
  (:func:`entry_problems`) and reported at once in one :class:`~lora_fx.errors.AdapterMismatchError`
  built by :func:`mismatch_error`;
* nothing is written before everything is checked, and the writes themselves are undone if one of
  them fails (:class:`Rollback`), so on any error the model is exactly as before (values,
  ``requires_grad``, ranks, scalings, the active set);
* keys are the plain module's: wrappers' parts (``_orig_mod.`` of ``torch.compile``, ``module.``
  of DDP) are removed from given keys (:func:`plain_keys`) and models are unwrapped
  (:func:`lora_fx.state.unwrap`).

Every safetensors file lora_fx writes carries a sha256 per tensor in its metadata
(:func:`safetensors_bytes`); :func:`read_safetensors` verifies them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence, Union

import torch
from torch import nn

from ..errors import AdapterFileError, AdapterMismatchError, LoraFxError, LoraFxWarning
from ..state import FILE_META, plain_name

__all__ = ["Saver", "Loader", "Entry", "entry_problems", "dtype_problem", "plain_keys", "mismatch_error",
           "Rollback", "adapter_state", "set_adapter_state_", "ADAPTER_STATE",
           "atomic_write", "atomic_write_bytes", "safetensors_bytes", "tensor_digest", "read_safetensors"]


class Saver(Protocol):
    """``save(model, path, *, **options) -> Path``: write the adapters of ``model`` to ``path``
    (atomically) and return it (e.g. :func:`lora_fx.io.save_lora_state`, :func:`lora_fx.save_adapter`)."""

    def __call__(self, model: nn.Module, path: Union[str, os.PathLike], /, **options: Any) -> Path: ...


class Loader(Protocol):
    """``load(model, source, *, **options) -> nn.Module``: load adapters from ``source`` (a path, a
    directory or a state dict) into ``model`` and return it, or raise :func:`mismatch_error`'s error
    with nothing changed (e.g. :func:`lora_fx.io.load_lora_state`, :func:`lora_fx.load_adapter`)."""

    def __call__(self, model: nn.Module, source: Any, /, **options: Any) -> nn.Module: ...


# ---------------------------------------------------------------------------------------------
# the contract


@dataclass(frozen=True)
class Entry:
    """What the model expects under one key.

    Attributes:
        shape: the model's shape.
        dtype: the model's dtype (a given tensor must cast to it exactly).
        required: a missing key is a problem.
        rank_axis: this axis may be smaller than ``shape``'s (a lower-rank factor, zero padded
            on load, up to the adapter's capacity); None: the shape must match exactly.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    required: bool = True
    rank_axis: Optional[int] = None


def dtype_problem(key: str, value: torch.Tensor, dtype: torch.dtype) -> Optional[str]:
    """Why ``value`` cannot be loaded into an entry of ``dtype``, or None.

    A value loads when casting it to ``dtype`` changes no element (the same dtype; a narrower
    float whose values the wider one holds; a wider one whose values happen to be representable)
    and it holds no inf/nan; a non-floating-point tensor never loads into a floating-point entry.
    """
    if dtype.is_floating_point and not value.is_floating_point():
        return f"{key!r}: file has dtype {value.dtype}, model has {dtype} (not a floating-point tensor)"
    if value.is_floating_point() and value.numel() and not bool(torch.isfinite(value).all()):
        return f"{key!r} holds inf/nan values"
    if value.dtype == dtype or not value.numel():
        return None
    back = value.to(dtype).to(value.dtype)
    changed = int((back != value).sum())
    if changed:
        return (f"{key!r}: file has dtype {value.dtype}, model has {dtype}, and the cast would change {changed} of "
                f"{value.numel()} values; cast the values to {dtype} first if that rounding is intended")
    return None


def _shape_problem(key: str, got: tuple, entry: Entry) -> Optional[str]:
    want = tuple(entry.shape)
    if got == want:
        return None
    ax = entry.rank_axis
    if ax is not None and len(got) == len(want) and all(g == w for i, (g, w) in enumerate(zip(got, want)) if i != ax):
        if 0 < got[ax] <= want[ax]:
            return None
        return (f"{key!r}: rank {got[ax]} exceeds the adapter's capacity {want[ax]}; call "
                f"lora_fx.reserve_rank_(gm, {got[ax]}) before compiling, or transform with that rank")
    return f"{key!r}: file has shape {got}, model has {want}"


def entry_problems(given: Mapping[str, torch.Tensor], expected: Mapping[str, Entry], *,
                   unexpected_why: Callable[[str], str] = lambda k: "not an adapter entry of the model",
                   missing_note: Callable[[str], str] = lambda k: "") -> list[str]:
    """Every problem of ``given`` against ``expected``, each naming its key, in key order:
    unexpected keys (``unexpected_why(key)`` says why), missing required keys, wrong shapes and
    wrong dtypes (:func:`dtype_problem`)."""
    problems = [f"unexpected key {k!r} ({unexpected_why(k)})" for k in sorted(set(given) - set(expected))]
    problems += [f"missing key {k!r}{missing_note(k)}" for k in sorted(k for k, e in expected.items()
                                                                        if e.required and k not in given)]
    for k in sorted(set(given) & set(expected)):
        v, e = given[k], expected[k]
        problems += [p for p in (_shape_problem(k, tuple(v.shape), e), dtype_problem(k, v, e.dtype)) if p]
    return problems


def plain_keys(state: Mapping[str, Any], model_keys: Iterable[str] = ()) -> dict[str, Any]:
    """``state`` with the parts wrappers insert removed from its keys: ``_orig_mod`` (and FSDP1 /
    checkpoint-wrapper parts) anywhere, and a leading ``module.`` (DDP) when every key has one and
    the model (whose plain keys are ``model_keys``) has no top-level ``module``."""
    out = {plain_name(k): v for k, v in state.items()}
    if out and all(k.startswith("module.") for k in out) and not any(k.startswith("module.") for k in model_keys):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


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


# ---------------------------------------------------------------------------------------------
# all-or-nothing writes

#: The attributes of an adapter a file restores besides its tensors (``scaling`` follows from them).
ADAPTER_STATE = ("rank", "alpha", "use_rslora", "mix", "active", "enabled")


def adapter_state(adapter: nn.Module) -> dict[str, Any]:
    """``{attribute: value}`` of :data:`ADAPTER_STATE` (JSON-safe)."""
    return {k: getattr(adapter, k) for k in ADAPTER_STATE}


def set_adapter_state_(adapter: nn.Module, values: Mapping[str, Any]) -> nn.Module:
    """Set the :data:`ADAPTER_STATE` attributes given in ``values`` and refill ``scaling`` in place."""
    for k in ADAPTER_STATE:
        if k in values:
            setattr(adapter, k, type(getattr(adapter, k))(values[k]))
    adapter.refresh_scaling_()
    return adapter


def _restore(t: torch.Tensor, saved: torch.Tensor) -> None:
    with torch.no_grad():  # on the tensor itself: its version counter records the write (caches key on it)
        t.copy_(saved)


class Rollback:
    """Undo log of a loader's writes: inside ``with Rollback() as undo:``, call :meth:`tensor`
    before writing a tensor in place and :meth:`attrs` before setting an object's attributes (or
    :meth:`call` to register any undo action); if the block raises, everything is restored (in
    reverse order, adapters' ``scaling`` refilled) and the error propagates."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        saved = t.detach().clone()
        self._undo.append(lambda: _restore(t, saved))
        return t

    def attrs(self, obj: Any, names: Iterable[str]) -> Any:
        saved = {n: getattr(obj, n) for n in names}

        def undo():
            for n, v in saved.items():
                setattr(obj, n, v)
            if hasattr(obj, "refresh_scaling_"):
                obj.refresh_scaling_()
        self._undo.append(undo)
        return obj

    def call(self, fn: Callable[[], None]) -> None:
        self._undo.append(fn)

    def __enter__(self) -> "Rollback":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            with torch.no_grad():
                for undo in reversed(self._undo):
                    undo()
        return False


# ---------------------------------------------------------------------------------------------
# files


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


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 (hex) of ``t``'s bytes as safetensors stores them (contiguous, little-endian)."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    h = hashlib.sha256()
    if flat.numel():
        h.update((flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)).numpy().tobytes())
    return h.hexdigest()


def safetensors_bytes(sd: dict[str, torch.Tensor], metadata: dict | None = None, *,
                      file_format: str = FILE_META["format"]) -> bytes:
    """``sd`` serialised as safetensors with ``{"format": file_format, **metadata}`` (non-string
    metadata values JSON-encoded) and the sha256 of every tensor under ``FILE_META["checksums"]``
    (verified by :func:`read_safetensors`)."""
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in sd.items()}
    meta = {"format": file_format, **{k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}}
    meta[FILE_META["checksums"]] = json.dumps({k: tensor_digest(v) for k, v in sorted(tensors.items())})
    return save(tensors, metadata=meta)


def _header_metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def read_safetensors(path: Union[str, os.PathLike], *, hint: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, never unpickling anything.

    Checksums written by :func:`safetensors_bytes` are verified.  A lora_fx file (its metadata
    names lora_fx) without them, written by an older lora_fx, loads with a
    :class:`~lora_fx.errors.LoraFxWarning`; files of other tools (PEFT's own) carry none and load
    silently.

    Raises:
        AdapterFileError: the file is missing, truncated or not safetensors (``hint`` says what to
            pass instead), or a tensor's bytes do not match its checksum (every such tensor named).
    """
    from safetensors.torch import load

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise AdapterFileError(f"adapter file {str(path)!r} does not exist; {hint}") from exc
    except IsADirectoryError as exc:
        raise AdapterFileError(f"adapter file {str(path)!r} is a directory; {hint}") from exc
    try:
        tensors = load(data)
        meta = _header_metadata(data)
    except Exception as exc:  # safetensors raises its own SafetensorError for bad headers
        raise AdapterFileError(
            f"adapter file {str(path)!r} is truncated or not a safetensors file ({type(exc).__name__}: {exc}). "
            "lora_fx reads only .safetensors files and never unpickles; copy the file again or re-save the "
            "adapter. The model was not changed.") from exc
    sums = meta.get(FILE_META["checksums"])
    if sums is None:
        if any(str(v).startswith("lora_fx") for v in meta.values()) or any(k.startswith("lora_fx") for k in meta):
            warnings.warn(f"adapter file {str(path)!r} has no checksums (written by an older lora_fx), so a corrupted "
                          "tensor cannot be detected; re-save it to add them", LoraFxWarning, stacklevel=3)
        return tensors, meta
    try:
        sums = json.loads(sums)
    except ValueError as exc:
        raise AdapterFileError(f"adapter file {str(path)!r}: its checksum metadata is corrupt ({exc})") from exc
    bad = sorted(k for k, v in tensors.items() if sums.get(k) != tensor_digest(v))
    bad += sorted(f"{k} (listed, but not in the file)" for k in set(sums) - set(tensors))
    if bad:
        raise AdapterFileError(
            f"adapter file {str(path)!r} is corrupt: the bytes of {len(bad)} tensor(s) do not match the checksums "
            f"written with them: {bad}. Copy the file again or re-save the adapter. The model was not changed.")
    return tensors, meta
