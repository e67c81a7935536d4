"""One frozen, serialisable configuration for an adapter; ``transform``'s keywords are shortcuts."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from .errors import ConfigError
from .fused import FusedSpec
from .weights import compute_dtype

__all__ = ["LoraConfig", "CONFIG_VERSION", "INITS", "CONFIG_KEYS", "UNSET", "as_patterns", "config_with", "PEFT_KEYWORDS",
           "unknown_keywords_message"]

CONFIG_VERSION = 1
#: Initialisation schemes of the factors (see :class:`LoraConfig`).
INITS = ("kaiming", "gaussian", "pissa")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def as_patterns(value: Union[None, str, Any], name: str) -> Optional[tuple[str, ...]]:
    """Normalise a glob pattern argument (``None``, one string, or a sequence of strings)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a glob pattern string or a list of them, got {type(value).__name__}") from None
    if not all(isinstance(p, str) for p in out):
        raise ConfigError(f"{name} must contain only strings (fnmatch patterns), got {out!r}")
    return out


@dataclass(frozen=True)
class LoraConfig:
    """Configuration of one LoRA adapter (Hu et al., 2022).

    Attributes:
        rank: ``r``, an int > 0 (default 16).
        alpha: ``alpha`` > 0; ``None`` means ``alpha = rank`` (scaling 1.0).  ``scaling = alpha / r``.
        targets: fnmatch patterns over fully qualified base-parameter names (e.g.
            ``"layers.*.attn.*.weight"``); ``None`` targets every supported weight.
        exclude: patterns removed from the targets (exclude wins).
        rank_pattern / alpha_pattern: ``{pattern: value}`` per-parameter overrides, resolved
            independently; the first matching pattern wins; a pattern matching nothing is an error.
        use_rslora: ``scaling = alpha / sqrt(r)`` (Kalajdzievski, 2023).
        init: ``"kaiming"`` (A kaiming-uniform, B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or
            ``"pissa"`` (Meng et al., 2024: ``s·B@A`` = the rank-r principal part ``U_r S_r V_rᵀ`` of
            ``W``, and the residual ``W - s·B@A`` is written into the adapted module's *own copy*
            of ``W``, so the model is unchanged at init; needs ``copy_weights=True``).
        use_dora: weight-decomposed LoRA (Liu et al., 2024): the op sees
            ``m · (W + s·B@A) / ‖W + s·B@A‖`` (norm per output row ``W[i]``; ``m`` trainable, starts
            at ``‖W[i]‖``); always merge-lowered.
        dropout: LoRA dropout probability in ``[0, 1)``: on the adapter branch's input at factored
            sites (none at factored embedding sites, whose input is indices, as in PEFT); at merge
            sites on ``lora_A``'s entries (DropConnect), since no per-example input reaches a
            merged weight.
        lowering: ``"auto"`` (factored where exact and cheaper, else merge), ``"factored"``
            (factored wherever exact) or ``"merge"`` (always ``op(x, W + ΔW)``).
        recompute_inputs: at factored linear sites whose input is the output of a norm, GELU/SiLU
            or ``a * b`` (see :mod:`lora_fx.recompute`), keep that op's inputs (saved anyway) instead of
            the adapter input and recompute it in backward: less activation memory for one cheap
            op per site in backward (eager autograd only).  ``False``: keep the input, as PEFT does.
        adapter_dtype: dtype name of the factors, or ``None``: float32 for float16/bfloat16
            weights, else the weight's dtype.
        fused: ``{pattern: FusedSpec | shortcut | None}``: per-block adapters on weights whose
            output rows are blocks (see :mod:`lora_fx.fused`); the first matching pattern wins;
            ``None`` asks for a plain adapter (MHA ``in_proj_weight`` is fused into q, k, v by default).
        trainable: fnmatch patterns over base module or parameter names (``"score"``,
            ``"score.*"``, ``"*.norm.weight"``) whose parameters train in full with this adapter
            (PEFT's ``modules_to_save``): they are unfrozen in the adapted copy (never in your
            model), get no adapter, are saved with the adapter (own files; PEFT files as
            ``modules_to_save``) and kept by ``fold``; ``None``: none.
        version: config schema version.
    """

    rank: int = 16
    alpha: Optional[float] = None
    targets: Optional[tuple[str, ...]] = None
    exclude: Optional[tuple[str, ...]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    init: str = "kaiming"
    use_dora: bool = False
    dropout: float = 0.0
    lowering: str = "auto"
    recompute_inputs: bool = True
    adapter_dtype: Optional[str] = None
    fused: dict[str, Any] = field(default_factory=dict)
    trainable: Optional[tuple[str, ...]] = None
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", as_patterns(self.targets, "targets"))
        object.__setattr__(self, "exclude", as_patterns(self.exclude, "exclude"))
        object.__setattr__(self, "trainable", as_patterns(self.trainable, "trainable"))
        object.__setattr__(self, "rank_pattern", dict(self.rank_pattern or {}))
        object.__setattr__(self, "alpha_pattern", dict(self.alpha_pattern or {}))
        if not isinstance(self.fused or {}, dict):
            raise ConfigError(f"fused must be a dict {{pattern: spec}}, got {type(self.fused).__name__}")
        object.__setattr__(self, "fused", {str(p): FusedSpec.coerce(v, f"fused[{p!r}]")
                                           for p, v in (self.fused or {}).items()})
        if isinstance(self.adapter_dtype, torch.dtype):
            object.__setattr__(self, "adapter_dtype", str(self.adapter_dtype).replace("torch.", ""))
        _check_rank(self.rank, "rank")
        if self.alpha is not None:
            _check_alpha(self.alpha, "alpha")
        for pat, r in self.rank_pattern.items():
            _check_rank(r, f"rank_pattern[{pat!r}]")
        for pat, a in self.alpha_pattern.items():
            _check_alpha(a, f"alpha_pattern[{pat!r}]")
        if not isinstance(self.dropout, numbers.Real) or not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.lowering not in ("auto", "factored", "merge"):
            raise ConfigError(f"lowering must be 'auto', 'factored' or 'merge', got {self.lowering!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if not isinstance(self.recompute_inputs, bool):
            raise ConfigError(f"recompute_inputs must be True or False, got {self.recompute_inputs!r}")
        if not isinstance(self.use_dora, bool):
            raise ConfigError(f"use_dora must be True or False, got {self.use_dora!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in _DTYPES:
            raise ConfigError(f"adapter_dtype must be one of {sorted(_DTYPES)} or None, got {self.adapter_dtype!r}")
        if self.version != CONFIG_VERSION:
            raise ConfigError(f"config version {self.version} is not supported (this lora_fx reads and writes version "
                              f"{CONFIG_VERSION}); build the config again with this lora_fx, LoraConfig(...), "
                              "or load the file with the lora_fx version that wrote it")

    # -- resolution -------------------------------------------------------------------------
    def rank_for(self, name: str) -> int:
        """Rank of the adapter on base parameter ``name`` (first matching ``rank_pattern``)."""
        return next((r for p, r in self.rank_pattern.items() if fnmatch.fnmatchcase(name, p)), self.rank)

    def alpha_for(self, name: str) -> float:
        """Alpha of the adapter on ``name``: first matching ``alpha_pattern``, else ``alpha``, else its rank."""
        a = next((a for p, a in self.alpha_pattern.items() if fnmatch.fnmatchcase(name, p)), self.alpha)
        return float(self.rank_for(name) if a is None else a)

    def dtype_for(self, weight: torch.Tensor) -> torch.dtype:
        """Dtype of the factors for base weight ``weight``: ``adapter_dtype``, else float32 for a
        float16 / bfloat16 compute dtype (:func:`lora_fx.weights.compute_dtype`), else that dtype."""
        if self.adapter_dtype is not None:
            return _DTYPES[self.adapter_dtype]
        dtype = compute_dtype(weight)
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def fused_for(self, name: str, default: bool) -> Any:
        """The :class:`~lora_fx.fused.FusedSpec` for base parameter ``name`` (first matching
        ``fused`` pattern), else ``FusedSpec()`` when its op has default blocks (``default``), else None."""
        for p, spec in self.fused.items():
            if fnmatch.fnmatchcase(name, p):
                return spec
        return FusedSpec() if default else None

    # -- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        for k in ("targets", "exclude", "trainable"):
            d[k] = list(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown LoraConfig field(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LoraConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "LoraConfig":
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)


#: The config fields ``transform`` / ``add_adapter`` take as keywords.
CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(LoraConfig) if f.name != "version")


class _Unset:
    """Default of a ``transform``/``add_adapter`` keyword: take the value from ``config`` (or the
    :class:`LoraConfig` default).  Shown as such by ``help()`` and ``inspect``."""

    def __repr__(self) -> str:
        return "<from config>"

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "UNSET"  # pickles as a reference to the one sentinel


#: The one :class:`_Unset` sentinel.
UNSET: Any = _Unset()


def config_with(config: Optional[LoraConfig], **options: Any) -> LoraConfig:
    """``config`` (default ``LoraConfig()``) with every option that is not :data:`UNSET` applied
    (validated, as :meth:`LoraConfig.replace`)."""
    given = {k: v for k, v in options.items() if v is not UNSET}
    base = config or LoraConfig()
    return base.replace(**given) if given else base


def _check_rank(r, what: str) -> None:
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
        raise ConfigError(f"{what} must be a positive int (the LoRA rank r), got {r!r}")


def _check_alpha(a, what: str) -> None:
    if isinstance(a, bool) or not isinstance(a, numbers.Real) or not (a > 0 and math.isfinite(a)):
        raise ConfigError(f"{what} must be a positive number (scaling = alpha / rank), got {a!r}")


#: PEFT ``LoraConfig`` field names and lora_fx's keyword for each (an unknown keyword error names it).
PEFT_KEYWORDS = {"r": "rank", "lora_alpha": "alpha", "target_modules": "targets ('*.q_proj.weight': full parameter "
                 "names, fnmatch)", "exclude_modules": "exclude", "lora_dropout": "dropout", "init_lora_weights": "init",
                 "modules_to_save": "trainable", "target_parameters": "targets"}


def unknown_keywords_message(where: str, unknown, valid) -> str:
    """``"<where> got unknown keyword(s) [...]; ..."``, naming lora_fx's keyword for PEFT's names."""
    unknown = sorted(unknown)
    peft = [f"{k} → {PEFT_KEYWORDS[k]}" for k in unknown if k in PEFT_KEYWORDS]
    return (f"{where} got unknown keyword(s) {unknown}; " + (f"PEFT's names are spelled here: {'; '.join(peft)}. "
            if peft else "") + f"Valid keywords: {sorted(valid)}")

