"""Reading a PEFT adapter directory and matching it to a model, without changing anything: the
plan :func:`lora_fx.io.peft.load_adapter` then carries out.

What a PEFT LoRA file may hold, and how each part is matched:

* LoRA layers (``<module>.lora_A.weight`` ...): one target per module, checked against the
  module's layer family, weight shape and the config's rank; modules sharing one weight (tied
  embeddings) become one lora_fx adapter and must carry the same update;
* ``modules_to_save`` (``<module>.<param or buffer>``, PEFT's fully trained copies, e.g. a
  classification head): the modules PEFT's suffix rule matches, every entry of their state;
* base weights PEFT saves next to targeted or resized embedding layers (``<module>.base_layer.weight``,
  or a plain ``<module>.weight``): accepted when equal to the model's, else a mismatch.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import AdapterFileError, ConfigError
from ..state import is_adapter_path, is_lora_key, plain_name
from ..weights import compute_dtype, logical_shape
from ._files import Entry, dtype_problem, entry_problems, read_safetensors
from ._peft_layout import LORA_SUFFIXES, expected_shapes, from_peft, pattern_key, peft_kind, peft_suffix_match

__all__ = ["Target", "Plan", "read_peft_dir", "check_peft_config", "plan_peft", "WEIGHTS_NAME", "CONFIG_NAME",
           "PEFT_PREFIX"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."


@dataclass
class Target:
    """One targeted module: its layer family, weight shape, rank, alpha and PEFT tensors; ``tied``
    lists the other modules that share its weight (one lora_fx adapter for all)."""

    module: str
    kind: str
    weight_shape: tuple
    rank: int
    alpha: float
    tensors: dict
    tied: list = field(default_factory=list)

    @property
    def params(self) -> list[str]:
        return [f"{m}.weight" for m in [self.module] + self.tied]


@dataclass
class Plan:
    """Targets (one per lora_fx adapter), ``modules_to_save`` entries ``{module: {key: tensor}}``
    and every problem found."""

    targets: list = field(default_factory=list)
    saved: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    #: modules the config's ``target_modules`` name but the file holds no tensors for (PEFT would
    #: give them fresh adapters; lora_fx leaves them out and says so)
    unmatched: list = field(default_factory=list)


def read_peft_dir(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a PEFT adapter directory (checksums verified where lora_fx wrote them).

    Raises:
        AdapterFileError: a file is missing or corrupt, or only a pickled ``adapter_model.bin`` exists.
    """
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    full = [n for n in ("model.safetensors", "model.safetensors.index.json") if (directory / n).is_file()]
    if not cfg_path.is_file() and full:
        raise AdapterFileError(
            f"'{directory}' holds a full model checkpoint ({full[0]}, as save_pretrained / Trainer.save_model "
            f"write it), not an adapter folder ({CONFIG_NAME} + {WEIGHTS_NAME}). Saved from an unfolded lora_fx "
            "model, it holds the adapters under lora_fx's names: rebuild the adapted model with the same "
            "lora_fx.transform(...) arguments and load it with adapted.load_state_dict(state) (state: "
            "safetensors.torch.load_file of the checkpoint file; for a sharded checkpoint, each shard with "
            "strict=False). To write an adapter folder, use lora_fx.save_adapter(adapted, directory).")
    for p in (cfg_path, w_path):
        if not p.is_file():
            extra = " (a pickled adapter_model.bin is never loaded; re-save it as safetensors)" \
                if p == w_path and (directory / "adapter_model.bin").exists() else ""
            raise AdapterFileError(f"'{p}' does not exist{extra}")
    try:
        config = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterFileError(f"'{cfg_path}' is not valid JSON: {exc}") from exc
    tensors, _ = read_safetensors(w_path, hint=f"pass the folder that PEFT's save_pretrained or lora_fx.save_adapter "
                                                f"wrote ({w_path.name} is not a safetensors file)")
    return config, tensors


def check_peft_config(config: dict, where: Path) -> None:
    """Raises :class:`~lora_fx.errors.ConfigError` for adapters or PEFT options lora_fx does not load."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"'{where}' holds a {config.get('peft_type')} adapter; lora_fx loads LoRA adapters only")
    unsupported = []
    if config.get("bias", "none") != "none":
        unsupported.append(f"bias={config['bias']!r} (trained biases)")
    if config.get("lora_bias"):
        unsupported.append("lora_bias=True")
    if config.get("trainable_token_indices"):
        unsupported.append("trainable_token_indices")
    if unsupported:
        raise ConfigError(f"'{where}' uses PEFT options lora_fx does not load: {', '.join(unsupported)}")


def _lora_target(model, name, t, config, problems):
    try:
        module = model.get_submodule(name)
    except AttributeError:
        problems.append(f"target module '{name}' is not in {type(model).__name__}")
        return None
    kind = peft_kind(module)
    weight = getattr(module, "weight", None)
    dora = bool(config.get("use_dora", False))
    if kind is None or not isinstance(weight, torch.Tensor):
        problems.append(f"target module '{name}' is a {type(module).__name__}, which the file's LoRA layout does not "
                        "fit (Linear, Embedding, ungrouped ConvNd, transformers Conv1D)")
        return None
    if dora and kind in ("embedding", "conv1d_gpt2"):
        problems.append(f"target module '{name}' ({kind}) uses DoRA, whose PEFT norm axis lora_fx does not reproduce "
                        "for this layout")
        return None
    first = "lora_embedding_A" if kind == "embedding" else "lora_A.weight"
    if first not in t:
        problems.append(f"target module '{name}' ({type(module).__name__}): file lacks '{first}' (has {sorted(t)})")
        return None
    r = int(t[first].shape[0])
    shape = logical_shape(weight)
    expected = expected_shapes(kind, shape, r, dora)
    for key in sorted(set(expected) | set(t)):
        if key not in t:
            problems.append(f"missing key '{name}.{key}' (model {type(module).__name__} {shape} expects shape "
                            f"{expected[key]})")
        elif key not in expected:
            problems.append(f"unexpected key '{name}.{key}' (not a tensor of {type(module).__name__} with dora={dora})")
        elif tuple(t[key].shape) != tuple(expected[key]):
            problems.append(f"'{name}.{key}': file has shape {tuple(t[key].shape)}, model {type(module).__name__} with "
                            f"weight {shape} expects {tuple(expected[key])}")
        else:
            dtype = compute_dtype(weight)  # the factors' dtype (LoraConfig.dtype_for)
            bad = dtype_problem(f"{name}.{key}", t[key], torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
            if bad:
                problems.append(bad)
    r_cfg = pattern_key(config.get("rank_pattern") or {}, name) or int(config.get("r", 8))
    if r != int(r_cfg):
        problems.append(f"'{name}': tensors have rank {r} but the config says r={r_cfg}")
    alpha = pattern_key(config.get("alpha_pattern") or {}, name)
    alpha = float(config.get("lora_alpha", 8) if alpha is None else alpha)
    return Target(name, kind, shape, r, alpha, t), weight


def _tie(targets_with_weights, problems) -> list[Target]:
    """One target per weight object: modules sharing a weight (tied) must carry the same update."""
    by_weight: dict[int, Target] = {}
    out = []
    for t, w in targets_with_weights:
        first = by_weight.get(id(w))
        if first is None:
            by_weight[id(w)] = t
            out.append(t)
            continue
        same = (first.rank, first.alpha, first.weight_shape) == (t.rank, t.alpha, t.weight_shape) and all(
            torch.equal(x, y) for x, y in zip(from_peft(first.kind, first.tensors), from_peft(t.kind, t.tensors)))
        if same:
            first.tied.append(t.module)
        else:
            problems.append(f"'{first.module}' and '{t.module}' share one weight (tied) in this model, and the file "
                            "gives them different updates: lora_fx keeps one adapter per weight. Untie the weights "
                            "before transform (transformers: tie_word_embeddings=False) or load the file with PEFT")
    return out


def plan_peft(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> Plan:
    """Match a PEFT file to ``model`` (unwrapped); returns the :class:`Plan` with every mismatch."""
    plan = Plan()
    problems = plan.problems
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        body = plain_name(key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key)
        suffix = next((s for s in LORA_SUFFIXES if body.endswith("." + s)), None)
        if suffix is None:
            others[body] = t
        else:
            grouped.setdefault(body[: -len(suffix) - 1], {})[suffix] = t
    found = [x for x in (_lora_target(model, name, grouped[name], config, problems) for name in sorted(grouped)) if x]
    plan.targets = _tie(found, problems)
    names = [n for n, _ in model.named_modules() if n and not is_adapter_path(n)]
    wanted = list(config.get("modules_to_save") or [])
    matched = [n for n in names if peft_suffix_match(n, wanted)]
    matched = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
    own = {plain_name(k): v for k, v in model.state_dict().items()}
    for body, t in sorted(others.items()):
        m = next((n for n in matched if body.startswith(n + ".")), None)
        if m is not None:
            plan.saved.setdefault(m, {})[body[len(m) + 1:]] = t
            continue
        base = body.replace(".base_layer.", ".")
        if base not in own or is_lora_key(base):
            problems.append(f"unexpected key '{body}' (neither a LoRA tensor, nor in modules_to_save={wanted}, nor a base "
                            f"entry of {type(model).__name__})")
        elif tuple(own[base].shape) != tuple(t.shape) or not torch.equal(t.to(own[base].dtype), own[base]):
            problems.append(
                f"'{body}': the file carries its own base weight for '{base}' (PEFT saves embedding layers' base "
                f"weights when they are targeted or resized), and it differs from the model's (shape {tuple(t.shape)} "
                f"vs {tuple(own[base].shape)}): the adapter was trained on another base (a resized vocabulary?); "
                "load it into that base model (e.g. model.resize_token_embeddings(n) first) or with PEFT")
    for m, entries in plan.saved.items():
        mod_sd = {k: v for k, v in model.get_submodule(m).state_dict().items() if not is_adapter_path(k)}
        expected = {k: Entry(tuple(v.shape), v.dtype) for k, v in mod_sd.items()}
        problems += [f"modules_to_save '{m}': {p}" for p in entry_problems(entries, expected)]
    if not grouped and not plan.saved and not problems:
        problems.append("the file holds no LoRA tensors")
    plan.unmatched = [n for n in names if n not in grouped and _named_by(n, config.get("target_modules"))
                      and not _named_by(n, config.get("exclude_modules"))
                      and peft_kind(model.get_submodule(n)) is not None]
    return plan


def _named_by(name: str, patterns) -> bool:
    """PEFT's ``target_modules`` rule: a regular expression matching the whole name, or a list of
    names matched exactly or as a dotted suffix."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == t or name.endswith("." + t) for t in patterns)
