"""transformers' adapter methods on a model lora_fx adapted.

A transformers ``PreTrainedModel`` carries PEFT's integration API (``PeftAdapterMixin``:
``model.disable_adapters()``, ``set_adapter``, ``load_adapter``, ...), which drives PEFT's own layers and
knows nothing of lora_fx's adapters: called on an adapted model it would fail (no PEFT adapter loaded,
or an unsupported PEFT version) or inject PEFT layers next to lora_fx's.  :func:`install_adapter_api_`
sets those methods on the adapted model (instance attributes, the class is unchanged) so that they act
on lora_fx's adapters with transformers' semantics:

================================================  =================================================
transformers method                               lora_fx
================================================  =================================================
``enable_adapters()`` / ``disable_adapters()``    :func:`lora_fx.enable_adapters_` (True / False)
``set_adapter(name or [names])``                  :func:`lora_fx.set_active_adapters` (they train)
``active_adapters()`` / ``active_adapter()``      :func:`lora_fx.active_adapters` (list / first)
``add_adapter(peft.LoraConfig, adapter_name)``    :func:`lora_fx.add_adapter`, made active
``delete_adapter(name or [names])``               :func:`lora_fx.delete_adapter`
``load_adapter(directory, adapter_name=...)``     :func:`lora_fx.load_adapter` (a local PEFT or lora_fx folder)
``get_adapter_state_dict(adapter_name)``          :func:`lora_fx.lora_state_dict` (lora_fx's names)
================================================  =================================================

A PEFT ``LoraConfig`` given to ``add_adapter`` is translated field by field (``r`` → ``rank``,
``lora_alpha`` → ``alpha``, ``target_modules`` names → ``*.<name>.weight`` patterns, ``"all-linear"``
→ the default targets, ...); a field lora_fx cannot honour is a :class:`~lora_fx.errors.ConfigError`
naming it and ``lora_fx.add_adapter``'s keyword.  ``lora_fx.fold`` removes the methods with the adapters.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from .adapter_methods import METHODS
from .adapters.hotswap import enable_adapters_
from .adapters.lifecycle import active_adapters, add_adapter, delete_adapter, set_active_adapters
from .adapters.trainable import mark_only_lora_as_trainable
from .errors import ConfigError
from .io.peft import load_adapter
from .io.state_dict import lora_state_dict
from .state import check_adapter_names, is_adapter_path

__all__: list[str] = []  # fills lora_fx.adapter_methods.METHODS


def _names(names) -> list[str]:
    return [names] if isinstance(names, str) else list(names)


def _enable_adapters(model: nn.Module) -> None:
    """Switch every lora_fx adapter on (``lora_fx.enable_adapters_(model, True)``)."""
    enable_adapters_(model, True)


def _disable_adapters(model: nn.Module) -> None:
    """Switch every lora_fx adapter off: the model computes the base model
    (``lora_fx.enable_adapters_(model, False)``; ``enable_adapters()`` switches them back on)."""
    enable_adapters_(model, False)


def _set_adapter(model: nn.Module, adapter_name) -> None:
    """Make ``adapter_name`` (a name or a list) the active adapters and the ones that train, as
    PEFT's ``set_adapter`` does (``lora_fx.set_active_adapters``, then
    ``lora_fx.mark_only_lora_as_trainable``)."""
    set_active_adapters(model, adapter_name)
    mark_only_lora_as_trainable(model)


def _active_adapters(model: nn.Module) -> list[str]:
    """The active lora_fx adapters (``lora_fx.active_adapters``)."""
    return active_adapters(model)


def _active_adapter(model: nn.Module) -> str:
    """The first active lora_fx adapter (transformers' deprecated ``active_adapter()``)."""
    names = _active_adapters(model)
    if not names:
        raise ConfigError("no lora_fx adapter is active; model.set_adapter(name) activates one")
    return names[0]


def _delete_adapter(model: nn.Module, adapter_names) -> None:
    """Delete lora_fx adapter(s) (``lora_fx.delete_adapter``, one name or a list)."""
    names = _names(adapter_names)
    check_adapter_names(model, names)  # all or nothing: no deletion before an unknown name is found
    for name in names:
        delete_adapter(model, name)


def _load_adapter(model: nn.Module, peft_model_id=None, adapter_name=None, **kwargs) -> None:
    """Load a local PEFT (or lora_fx ``save_adapter``) folder as adapter ``adapter_name``
    (``lora_fx.load_adapter``, default name ``"default"``)."""
    passed = sorted(k for k, v in kwargs.items() if v not in (None, False, "auto", {}))
    if passed or peft_model_id is None:
        raise ConfigError(
            f"model.load_adapter on a lora_fx model takes a local adapter folder and adapter_name only"
            f"{f', not {passed}' if passed else ''}: lora_fx.load_adapter(model, directory, adapter_name=...) "
            "reads PEFT's and its own folders (download Hub adapters first, e.g. huggingface_hub.snapshot_download)")
    load_adapter(model, peft_model_id, adapter_name=adapter_name or "default")


def _targets(model: nn.Module, value, field: str):
    """PEFT's ``target_modules`` / ``exclude_modules`` as lora_fx patterns: the ``weight`` of every
    module whose name is an entry or ends with ``"." + entry`` (PEFT's rule); ``"all-linear"`` is
    lora_fx's default targets (None)."""
    if value is None:
        return None
    if isinstance(value, str):
        if value == "all-linear":
            return None  # lora_fx's defaults on a transformers model are PEFT's all-linear
        raise ConfigError(f"PEFT {field}={value!r} is a regular expression; give lora_fx.add_adapter "
                          "targets= / exclude= as fnmatch patterns of parameter names (e.g. ['*.q_proj.weight'])")
    out = []
    names = [n for n, m in model.named_modules() if not is_adapter_path(n) and "weight" in m._parameters]
    for t in value:
        hits = [f"{n}.weight" for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise ConfigError(f"PEFT {field} entry {t!r} names no module with a weight in {type(model).__name__}")
        out += [h for h in hits if h not in out]
    return out


def _parameters(value):
    return None if not value else [p for t in value for p in (t, f"*.{t}")]


def _init(value):
    if value is True:
        return None
    if value in ("gaussian", "pissa"):
        return value
    raise ConfigError(f"PEFT init_lora_weights={value!r}: lora_fx initialises with init='kaiming' (PEFT's True), "
                      "'gaussian' or 'pissa'")


#: LoraConfig fields translated (or without effect on the adapter); any other one must keep PEFT's default
_TRANSLATED = frozenset({"task_type", "peft_type", "base_model_name_or_path", "revision", "inference_mode",
                         "auto_mapping", "r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "use_dora",
                         "init_lora_weights", "exclude_modules", "target_parameters", "modules_to_save",
                         "runtime_config"})


def _add_adapter(model: nn.Module, adapter_config, adapter_name=None) -> None:
    """Add a fresh lora_fx adapter described by a PEFT ``LoraConfig`` and make it the active one
    (transformers' ``add_adapter`` ends with ``set_adapter``); ``target_modules=None`` takes PEFT's
    defaults for the model type."""
    if type(adapter_config).__name__ != "LoraConfig":
        raise ConfigError(f"model.add_adapter on a lora_fx model takes a peft.LoraConfig, got "
                          f"{type(adapter_config).__name__}; or call lora_fx.add_adapter(model, name, rank=..., ...)")
    c = adapter_config
    default = type(c)()
    unsupported = sorted(f.name for f in dataclasses.fields(c) if f.name not in _TRANSLATED
                         and getattr(c, f.name) != getattr(default, f.name))
    if unsupported:
        raise ConfigError(f"PEFT LoraConfig fields {unsupported} have no lora_fx counterpart here; call "
                          "lora_fx.add_adapter(model, name, rank=..., targets=[...], rank_pattern={...}) directly")
    modules = c.target_modules
    if modules is None and not getattr(c, "target_parameters", None):  # PEFT's defaults for the architecture
        import peft.utils.constants as peft_constants

        kind = getattr(getattr(model, "config", None), "model_type", None)
        modules = peft_constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(kind)
        if modules is None:
            raise ConfigError(f"PEFT has no default target_modules for model_type {kind!r}: give target_modules "
                              "(or 'all-linear')")
    targets = _targets(model, modules, "target_modules")
    extra = _parameters(getattr(c, "target_parameters", None))
    if extra:
        targets = (targets or []) + extra if targets is not None or c.target_modules is not None else extra
    excluded = getattr(c, "exclude_modules", None)
    exclude = _targets(model, list(_names(excluded)), "exclude_modules") if excluded else None
    given = {"targets": targets, "exclude": exclude, "init": _init(c.init_lora_weights),
             "trainable": list(c.modules_to_save) if c.modules_to_save else None}
    add_adapter(model, adapter_name or "default", activate=False, rank=int(c.r), alpha=float(c.lora_alpha),
                dropout=float(c.lora_dropout or 0.0), use_rslora=bool(c.use_rslora), use_dora=bool(c.use_dora),
                **{k: v for k, v in given.items() if v is not None})
    _set_adapter(model, adapter_name or "default")  # transformers' add_adapter ends with set_adapter


def _get_adapter_state_dict(model: nn.Module, adapter_name=None, state_dict=None) -> dict:
    """The adapter's tensors under lora_fx's names (``lora_fx.lora_state_dict``; the active adapter by
    default).  For a PEFT folder use ``lora_fx.save_adapter(model, directory)``."""
    if state_dict is not None:
        raise ConfigError("get_adapter_state_dict(state_dict=...) is PEFT's; lora_fx reads the model's own tensors")
    mark = f"lora.{adapter_name or _active_adapter(model)}."
    return {k: v for k, v in lora_state_dict(model).items() if k.startswith(mark) or f".{mark}" in k}


METHODS.update({
    "enable_adapters": _enable_adapters, "disable_adapters": _disable_adapters, "set_adapter": _set_adapter,
    "active_adapters": _active_adapters, "active_adapter": _active_adapter, "add_adapter": _add_adapter,
    "delete_adapter": _delete_adapter, "load_adapter": _load_adapter, "get_adapter_state_dict": _get_adapter_state_dict,
})
