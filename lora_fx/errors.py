"""One error hierarchy for lora_fx.

Every error lora_fx raises on purpose derives from :class:`LoraFxError`; each subclass also
derives from the matching builtin (``ValueError``, ``TypeError``, ...), so code written against
builtins keeps working.  Messages name the culprit (module, parameter or graph node) and the fix.
(Pattern after HF PEFT's error classes, which subclass ``ValueError``.)
"""

from __future__ import annotations

import os
import traceback
from typing import Iterable, Optional

import torch

__all__ = [
    "LoraFxError",
    "LoraFxWarning",
    "ConfigError",
    "TargetError",
    "TraceError",
    "InputGuardError",
    "UnsupportedSiteError",
    "NotAdaptedError",
    "UnknownAdapterError",
    "AlreadyAdaptedError",
    "AdapterMismatchError",
    "AdapterFileError",
    "NonFiniteError",
    "ExportParityError",
    "ExportFileError",
    "user_frame",
]


class LoraFxError(Exception):
    """Base class of every error lora_fx raises on purpose."""


class LoraFxWarning(UserWarning):
    """Warnings lora_fx emits (e.g. a rank larger than the weight allows)."""


class ConfigError(LoraFxError, ValueError):
    """An argument of ``transform`` (rank, alpha, dropout, lowering, ...) is invalid."""


class TargetError(LoraFxError, ValueError):
    """``targets`` / ``exclude`` patterns match nothing, or name a parameter that cannot be adapted."""


class TraceError(LoraFxError, RuntimeError):
    """The model could not be captured as a graph by the chosen front-end."""


class InputGuardError(LoraFxError, AssertionError):
    """A call of a model captured by the export front-end with an input outside what the capture
    specialised on (a size outside its range, another value of a baked-in argument): the graph
    holds one branch of the forward's Python, taken for the example inputs.  An ``AssertionError``,
    as torch.export's own program raises ("Guard failed") and torch.fx's guard of a ``concrete_args``
    value."""


class UnsupportedSiteError(LoraFxError, NotImplementedError):
    """A parameter named by ``targets`` is consumed by an op the pass cannot rewrite, or ``fold``
    cannot give an untargeted alias of a shared module its base weight back."""


class NotAdaptedError(LoraFxError, TypeError):
    """An operation that needs a module produced by :func:`lora_fx.transform` got another module."""


class UnknownAdapterError(ConfigError, NotAdaptedError):
    """An adapter name that the adapted module does not have (the message lists the ones it has).
    Also a :class:`ConfigError` (a ``ValueError``) and a :class:`NotAdaptedError`, the errors an
    unknown name raised before this class existed."""


class AlreadyAdaptedError(LoraFxError, ValueError):
    """``transform`` was called on a module that already carries lora_fx adapters."""


class AdapterMismatchError(LoraFxError, ValueError):
    """An adapter state (dict or file) does not fit the model: missing, unexpected or mis-shaped keys."""


class AdapterFileError(LoraFxError, OSError):
    """An adapter file is missing, truncated or corrupt."""


class NonFiniteError(LoraFxError, ValueError):
    """An adapter holds inf / NaN values where lora_fx must write a finite result (``fold``): a
    diverged training run, typically."""


class ExportParityError(LoraFxError, RuntimeError):
    """An exported (folded) program does not reproduce the eager adapted model."""


class ExportFileError(LoraFxError, OSError):
    """An exported program (``.pt2`` / ``.onnx``) could not be written to the requested path."""


_OWN_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def user_frame(exc: BaseException, *, also_skip: Iterable[str] = (),
               skip_synthetic: bool = False) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame of ``exc`` outside torch and lora_fx (the user's line, for a
    message that names it), or None.

    Args:
        exc: the error.
        also_skip: more directories to skip (the passes' own, which an editable install keeps
            outside the package directory).
        skip_synthetic: also skip frames of code without a file (``"<string>"``, ...).
    """
    skip = (os.path.dirname(torch.__file__), _OWN_DIR) + tuple(os.path.abspath(d) + os.sep for d in also_skip)
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not os.path.abspath(f.filename).startswith(skip) and "<eval_with_key>" not in f.filename
              and not (skip_synthetic and f.filename.startswith("<"))]
    return frames[-1] if frames else None

