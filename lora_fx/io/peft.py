"""HF PEFT adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``.

:func:`save_adapter` writes what ``peft.PeftModel.from_pretrained(base_model, directory)`` loads
onto the same base model; :func:`load_adapter` reads a PEFT-saved LoRA adapter.  Safetensors and
JSON only (never pickle); files are written atomically (:func:`lora_fx.io._files.atomic_write_bytes`).

Layouts (``W`` the base weight; ours: ``ΔW = s·(B @ A).reshape(W.shape)``, ``A: (r, W[0].numel())``,
``B: (W.shape[0], r)``; PEFT keys are ``base_model.model.<module>.<name>``):

=================  ====================  ==================================================
module             W                     PEFT tensors
=================  ====================  ==================================================
``nn.Linear``      ``(out, in)``         ``lora_A.weight = A``, ``lora_B.weight = B``
``nn.ConvNd``      ``(out, in, *k)``     ``lora_A.weight = A.view(r, in, *k)``,
                                         ``lora_B.weight = B.view(out, r, 1, ...)``
``nn.Embedding``   ``(num, dim)``        ``lora_embedding_A = Bᵀ (r, num)``,
                                         ``lora_embedding_B = Aᵀ (dim, r)`` (transposed)
GPT-2 ``Conv1D``   ``(in, out)``         ``lora_A.weight = Bᵀ (r, in)``,
                                         ``lora_B.weight = Aᵀ (out, r)`` (transposed;
                                         PEFT's ``fan_in_fan_out=True``)
DoRA (Linear,      ``m: (out,)``         ``lora_magnitude_vector``: ``(out,)`` for Linear,
Conv)                                    ``(1, out, 1, ...)`` for Conv
=================  ====================  ==================================================
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import fx, nn

from ..adapters.lifecycle import adapter_names, add_adapter, named_adapters, set_active_adapters
from ..api import transform
from ..config import LoraConfig
from ..errors import AdapterFileError, AdapterMismatchError, ConfigError, UnsupportedSiteError
from ..state import FILE_META, PISSA_BUFFERS, check_adapter_names, configs_of, is_adapted, sites
from ..weights import logical_shape
from ._files import atomic_write_bytes, dir_source, dir_target, mismatch_error

__all__ = ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME", "PEFT_PREFIX"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


_EXPORTED_KINDS = {"Linear": "linear", "Embedding": "embedding", "Conv1d": "conv", "Conv2d": "conv",
                   "Conv3d": "conv", "Conv1D": "conv1d_gpt2"}


def _exported_kind(module: fx.GraphModule) -> Optional[str]:
    """Kind of a leaf captured by the torch.export front-end: a GraphModule carrying the original
    class name, whose graph holds the one ATen op (convolutions: ungrouped only)."""
    kind = _EXPORTED_KINDS.get(type(module).__name__)
    if kind == "conv":
        for node in module.graph.nodes:
            if node.op == "call_function" and "conv" in str(node.target):
                groups = node.args[8] if "convolution" in str(node.target) and len(node.args) > 8 else (
                    node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1))
                return "conv" if groups == 1 else None
    return kind


def _kind(module: nn.Module) -> Optional[str]:
    """PEFT layer family of ``module``, or None when PEFT's LoRA does not cover it."""
    if isinstance(module, fx.GraphModule):
        return _exported_kind(module)
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv" if module.groups == 1 else None
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers."):
        return "conv1d_gpt2"
    return None


def _expected(kind: str, shape: tuple, r: int, dora: bool) -> dict[str, tuple]:
    """PEFT tensor names → shapes for a module of ``kind`` with weight ``shape`` and rank ``r``."""
    if kind == "linear":
        out = {"lora_A.weight": (r, shape[1]), "lora_B.weight": (shape[0], r)}
        mag = (shape[0],)
    elif kind == "conv":
        out = {"lora_A.weight": (r,) + tuple(shape[1:]), "lora_B.weight": (shape[0], r) + (1,) * (len(shape) - 2)}
        mag = (1, shape[0]) + (1,) * (len(shape) - 2)
    elif kind == "embedding":
        out = {"lora_embedding_A": (r, shape[0]), "lora_embedding_B": (shape[1], r)}
        mag = None
    else:  # conv1d_gpt2, W: (in, out)
        out = {"lora_A.weight": (r, shape[0]), "lora_B.weight": (shape[1], r)}
        mag = None
    if dora:
        out["lora_magnitude_vector"] = mag
    return out


def _to_peft(kind: str, a: torch.Tensor, b: torch.Tensor, shape: tuple) -> dict[str, torch.Tensor]:
    r = a.shape[0]
    if kind == "linear":
        return {"lora_A.weight": a, "lora_B.weight": b}
    if kind == "conv":
        return {"lora_A.weight": a.reshape((r,) + tuple(shape[1:])),
                "lora_B.weight": b.reshape((shape[0], r) + (1,) * (len(shape) - 2))}
    if kind == "embedding":
        return {"lora_embedding_A": b.t(), "lora_embedding_B": a.t()}
    return {"lora_A.weight": b.t(), "lora_B.weight": a.t()}


def _from_peft(kind: str, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT tensors → our ``(A, B)``."""
    if kind == "linear":
        return t["lora_A.weight"], t["lora_B.weight"]
    if kind == "conv":
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if kind == "embedding":
        return t["lora_embedding_B"].t(), t["lora_embedding_A"].t()
    return t["lora_B.weight"].t(), t["lora_A.weight"].t()


def _pattern_key(patterns: dict, name: str):
    """PEFT's rule (``peft.utils.other.get_pattern_key``): first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", name)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _exact(name: str) -> str:
    return "^" + re.escape(name)


# ---------------------------------------------------------------------------------------------
# save


def save_adapter(gm: nn.Module, directory: Union[str, os.PathLike], *, adapter: str = "default",
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Write adapter ``adapter`` of ``gm`` in HF PEFT's format: ``directory/adapter_model.safetensors``
    and ``directory/adapter_config.json`` (``peft.PeftModel.from_pretrained(base_model, directory)``
    reproduces ``gm``'s outputs with only that adapter active).  Each file is written atomically.

    The saved values are the factors and the *base* scaling ``alpha / r`` (or ``alpha / sqrt(r)``);
    mixing weights and enabled flags are runtime state and are not saved.  ``target_modules`` is an
    anchored regular expression naming exactly the adapted modules; ranks and alphas that differ
    from the most common one go to ``rank_pattern`` / ``alpha_pattern`` (anchored keys).

    Args:
        gm: an adapted module.
        directory: output folder (created).
        adapter: adapter name.
        base_model_name_or_path: recorded in the config (PEFT's field), optional.

    Returns:
        ``Path(directory)``.

    Raises:
        UnknownAdapterError: unknown adapter name.
        ConfigError: a PiSSA adapter with DoRA (a plain PiSSA adapter is
            written as PEFT's PiSSA-to-LoRA conversion: rank ``2r``, ``[B, -B0] @ [A; A0]``, which
            applies to the original weights; alpha adjusted so the scaling is unchanged).
        UnsupportedSiteError: a site PEFT's LoRA cannot express (a parameter other than a module's
            ``weight``; a module type other than Linear, Embedding, ungrouped ConvNd, GPT-2 Conv1D;
            DoRA on Embedding / Conv1D, whose PEFT norm axis differs; a tied weight) — all listed.
        AdapterFileError: ``directory`` is an existing file, or below a file.
    """
    from safetensors.torch import save

    out = dir_target(directory, what="save_adapter", other="lora_fx.io.save_lora_state(model, path)")
    check_adapter_names(gm, [adapter])
    cfg = configs_of(gm).get(adapter)
    chosen = [s for s in sites(gm) if s.adapter == adapter]
    pissa = [s for s in chosen if hasattr(s.module, PISSA_BUFFERS[0])]
    if pissa and any(s.module.use_dora for s in pissa):
        raise ConfigError(
            f"adapter {adapter!r} combines PiSSA and DoRA: its base is the residual W - s·B0@A0 held in this "
            "module, and DoRA's normalisation does not let it be re-expressed on the original W. Save "
            "lora_fx.fold(gm) as a full model instead.")
    problems, entries = [], []
    for s in chosen:
        owner, _, pname = s.param.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        kind = _kind(module)
        if pname != "weight" or kind is None:
            problems.append(f"'{s.param}' ({type(module).__name__}.{pname}, {s.op}): PEFT LoRA adapts the "
                            "weight of Linear, Embedding, ungrouped Conv1d/2d/3d and transformers Conv1D only")
        elif len(s.aliases) > 1:
            problems.append(f"'{s.param}' is tied to {list(s.aliases[1:])}: PEFT adapts modules, not tied weights")
        elif s.module.use_dora and kind in ("embedding", "conv1d_gpt2"):
            problems.append(f"'{s.param}' ({kind}) uses DoRA: PEFT normalises this layout along the other "
                            "axis, so the file would compute something else")
        else:
            a, b, rank, alpha = s.module.lora_A.detach(), s.module.lora_B.detach(), s.rank, s.alpha
            if hasattr(s.module, PISSA_BUFFERS[0]):
                # PiSSA: W_res + s·B@A = W + s·(B@A - B0@A0) = W + s·[B, -B0] @ [A; A0] on the original W
                a0, b0 = (getattr(s.module, n) for n in PISSA_BUFFERS)
                a = torch.cat([a, a0.to(a.dtype)])
                b = torch.cat([b, -b0.to(b.dtype)], dim=1)
                rank = 2 * s.rank
                alpha = s.module.base_scaling * (rank ** 0.5 if s.module.use_rslora else rank)
            entries.append((owner, kind, s, a, b, rank, alpha))
    if problems:
        raise mismatch_error(f"adapter {adapter!r} cannot be written in PEFT's format", problems,
                             outcome="nothing was written", error=UnsupportedSiteError)
    tensors: dict[str, torch.Tensor] = {}
    for owner, kind, s, a, b, _, _ in entries:
        for key, t in _to_peft(kind, a, b, s.shape).items():
            tensors[f"{PEFT_PREFIX}{owner}.{key}"] = t.contiguous().clone()
        if s.module.use_dora:
            shape = _expected(kind, s.shape, s.rank, True)["lora_magnitude_vector"]
            tensors[f"{PEFT_PREFIX}{owner}.lora_magnitude_vector"] = \
                s.module.lora_magnitude.detach().reshape(shape).contiguous().clone()
    r0 = Counter(e[5] for e in entries).most_common(1)[0][0]
    a0 = Counter(e[6] for e in entries).most_common(1)[0][0]
    first = entries[0][2].module
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": a0,
        "target_modules": "^(?:" + "|".join(re.escape(e[0]) for e in entries) + ")$",
        "exclude_modules": None,
        "rank_pattern": {_exact(e[0]): e[5] for e in entries if e[5] != r0},
        "alpha_pattern": {_exact(e[0]): e[6] for e in entries if e[6] != a0},
        "use_rslora": bool(first.use_rslora),
        "use_dora": bool(first.use_dora),
        "lora_dropout": float(getattr(getattr(first, "dropout", None), "p", 0.0)),
        "fan_in_fan_out": any(e[1] == "conv1d_gpt2" for e in entries),
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", FILE_META["adapter"]: adapter}
    if cfg is not None:
        meta[FILE_META["config"]] = cfg.to_json()
    atomic_write_bytes(out / WEIGHTS_NAME, save(tensors, metadata=meta))
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out


# ---------------------------------------------------------------------------------------------
# load


@dataclass
class _Target:
    module: str
    kind: str
    weight_shape: tuple
    rank: int
    alpha: float
    tensors: dict


_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _read(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load

    dir_source(directory, what="load_adapter", other="lora_fx.io.load_lora_state(model, path)")
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            extra = " (a pickled adapter_model.bin is never loaded; re-save it as safetensors)" \
                if p == w_path and (directory / "adapter_model.bin").exists() else ""
            raise AdapterFileError(f"'{p}' does not exist{extra}")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"'{cfg_path}' is not valid JSON: {exc}") from exc
    try:
        tensors = load(w_path.read_bytes())
    except Exception as exc:  # safetensors' own error type for bad headers
        raise AdapterFileError(f"'{w_path}' is truncated or not a safetensors file: {exc}") from exc
    return config, tensors


def _check_config(config: dict, where: Path) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"'{where}' holds a {config.get('peft_type')} adapter; lora_fx loads LoRA adapters only")
    unsupported = []
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r} (trained biases)")
    if config.get("lora_bias"):
        unsupported.append("lora_bias=True")
    if config.get("modules_to_save"):
        unsupported.append(f"modules_to_save={config['modules_to_save']!r}")
    if config.get("trainable_token_indices"):
        unsupported.append("trainable_token_indices")
    if unsupported:
        raise ConfigError(f"'{where}' uses PEFT options lora_fx does not load: {', '.join(unsupported)}")


def _plan(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> tuple[list[_Target], list[str]]:
    """Match the file to ``model``; returns the targets and every mismatch (nothing is changed)."""
    problems: list[str] = []
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        suffix = next((s for s in _SUFFIXES if body.endswith("." + s)), None)
        if suffix is None:
            problems.append(f"unrecognised tensor {key!r} (expected <module>.lora_A.weight, .lora_B.weight, "
                            ".lora_embedding_A/B or .lora_magnitude_vector)")
            continue
        grouped.setdefault(body[: -len(suffix) - 1], {})[suffix] = t
    dora = bool(config.get("use_dora", False))
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", 8))
    targets = []
    for name in sorted(grouped):
        t = grouped[name]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"target module '{name}' is not in {type(model).__name__}")
            continue
        kind = _kind(module)
        weight = getattr(module, "weight", None)
        if kind is None or not isinstance(weight, torch.Tensor):
            problems.append(f"target module '{name}' is a {type(module).__name__}, which the file's LoRA layout "
                            "does not fit (Linear, Embedding, ungrouped ConvNd, transformers Conv1D)")
            continue
        if dora and kind in ("embedding", "conv1d_gpt2"):
            problems.append(f"target module '{name}' ({kind}) uses DoRA, whose PEFT norm axis lora_fx does not "
                            "reproduce for this layout")
            continue
        first = "lora_embedding_A" if kind == "embedding" else "lora_A.weight"
        if first not in t:
            problems.append(f"target module '{name}' ({type(module).__name__}): file lacks '{first}' "
                            f"(has {sorted(t)})")
            continue
        r = int(t[first].shape[0])
        shape = logical_shape(weight)
        r_cfg = _pattern_key(config.get("rank_pattern") or {}, name) or r_default
        expected = _expected(kind, shape, r, dora)
        for key in sorted(set(expected) | set(t)):
            if key not in t:
                problems.append(f"'{name}.{key}': missing from the file (model {type(module).__name__} "
                                f"{shape} expects shape {expected[key]})")
            elif key not in expected:
                problems.append(f"'{name}.{key}': unexpected for {type(module).__name__} (dora={dora})")
            elif tuple(t[key].shape) != tuple(expected[key]):
                problems.append(f"'{name}.{key}': file has shape {tuple(t[key].shape)}, model "
                                f"{type(module).__name__} with weight {shape} expects "
                                f"{tuple(expected[key])}")
        if r != int(r_cfg):
            problems.append(f"'{name}': tensors have rank {r} but the config says r={r_cfg}")
        alpha = _pattern_key(config.get("alpha_pattern") or {}, name)
        alpha = float(alpha_default if alpha is None else alpha)
        targets.append(_Target(name, kind, shape, r, alpha, t))
    if not grouped and not problems:
        problems.append("the file holds no LoRA tensors")
    return targets, problems


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], *, adapter_name: str = "default",
                 activate: bool = True, **capture) -> nn.Module:
    """Load a LoRA adapter saved by HF PEFT (``save_pretrained``) or :func:`save_adapter`.

    * ``model`` is a plain module: returns ``lora_fx.transform(model, ...)`` with the adapter
      (``model`` is untouched);
    * ``model`` is a lora_fx module: adds adapter ``adapter_name`` to it in place (or, when an
      adapter of that name already adapts exactly the file's modules with the same ranks, loads
      the values into it) and returns it.

    Scaling is PEFT's: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per-module
    ``rank_pattern`` / ``alpha_pattern`` resolved as PEFT does.  Everything is checked before
    anything changes: on error the model is exactly as before.

    Args:
        model: the base model (same architecture as the one the adapter was trained on).
        directory: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        adapter_name: name of the adapter in lora_fx.
        activate: make it the only active adapter (as ``PeftModel.from_pretrained``; note that
            :func:`lora_fx.add_adapter` leaves a new adapter inactive instead).
        **capture: for a plain ``model``, :func:`lora_fx.transform`'s capture keywords
            (``frontend``, ``example_inputs``, ``example_kwargs``, ``dynamic_shapes``, ``blocks``,
            ``leaf_modules``, ``concrete_args``, ``copy_weights``); e.g. ``example_inputs=(ids,)``
            for Hugging Face models, which need the export front-end.

    Raises:
        AdapterFileError: a file is missing, corrupt, or only a pickled ``adapter_model.bin`` exists;
            ``directory`` is a file or does not exist.
        ConfigError: not a LoRA adapter, or PEFT options lora_fx does not load (trained biases,
            ``modules_to_save``, ...).
        AdapterMismatchError: one error listing every target module that is missing from the model,
            of another type, or whose tensors have other shapes (file shape and expected shape), and
            an existing adapter ``adapter_name`` with other targets.
    """
    directory = Path(directory)
    config, tensors = _read(directory)
    _check_config(config, directory)
    adapted = is_adapted(model)
    targets, problems = _plan(model, config, tensors)
    if adapted and adapter_name in adapter_names(model) and not problems:
        have = {s.param: (s.rank, s.alpha, s.module.use_dora) for s in sites(model) if s.adapter == adapter_name}
        want = {f"{t.module}.weight": (t.rank, t.alpha, bool(config.get("use_dora", False))) for t in targets}
        if have != want:
            problems.append(f"adapter {adapter_name!r} already exists with (rank, alpha, dora) per target {have}, "
                            f"the file has {want}; pass another adapter_name= or delete_adapter() first")
    if problems:
        raise mismatch_error(f"adapter in '{directory}' does not fit {type(model).__name__}", problems)
    cfg = LoraConfig(
        rank=targets[0].rank, alpha=targets[0].alpha,
        targets=tuple(f"{t.module}.weight" for t in targets),
        rank_pattern={f"{t.module}.weight": t.rank for t in targets},
        alpha_pattern={f"{t.module}.weight": t.alpha for t in targets},
        use_rslora=bool(config.get("use_rslora", False)), use_dora=bool(config.get("use_dora", False)),
        dropout=float(config.get("lora_dropout", 0.0) or 0.0))
    if not adapted:
        gm = transform(model, config=cfg, adapter_name=adapter_name, **capture)
    elif adapter_name not in adapter_names(model):
        gm = add_adapter(model, adapter_name, config=cfg)
    else:
        gm = model
    by_param = {s.param: s.module for s in sites(gm) if s.adapter == adapter_name}
    with torch.no_grad():
        for t in targets:
            mod = by_param[f"{t.module}.weight"]
            a, b = _from_peft(t.kind, t.tensors)
            mod.lora_A.copy_(a.reshape(mod.lora_A.shape))
            mod.lora_B.copy_(b.reshape(mod.lora_B.shape))
            if mod.use_dora:
                mod.lora_magnitude.copy_(t.tensors["lora_magnitude_vector"].reshape(-1))
    if activate:
        set_active_adapters(gm, [adapter_name])
    loaded = {name for name, _, _ in named_adapters(gm)}
    if adapter_name not in loaded or len(by_param) != len(targets):  # never silently load nothing
        raise AdapterMismatchError(f"adapter in '{directory}': {len(targets)} targets in the file, "
                                   f"{len(by_param)} adapted sites in the model")
    return gm
