"""HF PEFT adapter files: ``adapter_model.safetensors`` + ``adapter_config.json``.

:func:`save_adapter` writes what ``peft.PeftModel.from_pretrained(base_model, directory)`` loads
onto the same base model; :func:`load_adapter` reads a PEFT-saved LoRA adapter.  Safetensors and
JSON only (never pickle); files are written atomically (:func:`lora_fx.io._files.atomic_write_bytes`)
with a sha256 per tensor in the metadata (PEFT ignores it; lora_fx verifies it).  The layouts are
in :mod:`lora_fx.io._peft_layout`, the matching of a file to a model in :mod:`lora_fx.io._peft_plan`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..adapters.lifecycle import add_adapter, delete_adapter, named_adapters, set_active_adapters
from ..api import transform
from ..config import LoraConfig
from ..errors import AdapterMismatchError, ConfigError, LoraFxWarning, UnsupportedSiteError
from ..buffers import changed_buffers
from ..state import (FILE_META, PISSA_BUFFERS, adapter_names, adapter_records, check_adapter_names,
                     configs_of, is_adapted, is_adapter_path, is_lora_key, region_of, trainable_params, unwrap)
from ..site_view import sites
from . import peft_experts
from ._files import ADAPTER_STATE, Rollback, atomic_write_bytes, mismatch_error, safetensors_bytes
from ._paths import dir_source, dir_target
from ._peft_layout import expected_shapes, from_peft, peft_factors, peft_kind, to_peft
from ._peft_layout import from_peft as _from_peft, to_peft as _to_peft  # noqa: F401  (old private names)
from ._peft_plan import CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, Plan, check_peft_config, plan_peft, read_peft_dir

__all__ = ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME", "PEFT_PREFIX"]


#: The op kinds (``Site.ops``) of a module's own call, per PEFT layer family.
_OWN_OPS = {"linear": ("linear",), "embedding": ("embedding",), "conv": ("conv1d", "conv2d", "conv3d"),
            "conv1d_gpt2": ("addmm",)}


def _exact(name: str) -> str:
    return "^" + re.escape(name)


# ---------------------------------------------------------------------------------------------
# save


def _inside_owner(node) -> bool:
    """Whether a ``get_attr`` of ``<owner>.weight`` was traced inside ``<owner>``'s own forward
    (torch.fx records the module stack of every node), as PEFT, which wraps the module, sees it."""
    stack = node.meta.get("nn_module_stack") or {}
    inner = list(stack.values())[-1][0] if stack else None
    return inner is not None and inner == node.target.rpartition(".")[0]


def _switched_off(s) -> Optional[str]:
    """Why site ``s`` cannot be written (mixing weight 0: PEFT has no switch), or None."""
    if s.module.mix != 0.0:
        return None
    return (f"'{s.param}': mixing weight 0 switches the adapter off and PEFT has no switch; "
            "set_scale_(gm, 1.0) (or set_active_adapters) to save its trained values")


def _read_outside(model: nn.Module, s, owner: str) -> Optional[str]:
    """Why PEFT's ``target_parameters`` wrapper of module ``owner`` (which adds ``ΔW`` to the
    parameter while the module runs) would miss a consumer of site ``s``, or None: every graph
    reading it is the module's own (a region) or reads it inside the module's call."""
    for prefix, _, rec, a in adapter_records(model):
        if a is not s.module or rec.adapter != s.adapter or prefix[:-1] == owner:
            continue
        holder = model.get_submodule(prefix[:-1]) if prefix else model
        nodes = {n.name: n for n in (region_of(holder) or holder).graph.nodes}
        for node, op, _ in rec.consumers:
            n = nodes.get(node)
            if getattr(n, "op", None) == "get_attr" and not _inside_owner(n):
                return (f"'{s.param}' is also read outside its module's forward (by {op}, graph node {node!r}), and "
                        "PEFT's target_parameters adapt it only while its module runs: the file would compute "
                        f"something else. Leave it out with exclude=['{s.param}'] to save the rest")
    return None


def _owners(model: nn.Module, s, names_of: dict) -> tuple[list[tuple[str, str]], Optional[str]]:
    """``[(module, PEFT kind)]`` of the modules whose calls consume site ``s`` (one per targeted
    alias of a tied weight), or ``([], why)`` when PEFT, which adapts module calls, cannot express it.
    ``names_of``: ``{id(module): [every name it is registered under]}``."""
    owners = []
    for alias in s.aliases:
        owner, _, pname = alias.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        kind = peft_kind(module)
        if pname != "weight" or kind is None or not owner:
            return [], (f"'{alias}' ({type(module).__name__}.{pname}, {s.op}): PEFT LoRA adapts the weight of Linear, "
                        "Embedding, ungrouped Conv1d/2d/3d and transformers Conv1D modules only")
        others = [n for n in names_of.get(id(module), []) if n != owner]
        if others:
            return [], (f"'{alias}': its module '{owner}' is also registered as {others} (one module called under "
                        "several names); PEFT wraps it under one name only, so the other calls would not see the "
                        f"adapter. Leave it out with exclude=['{s.param}'] to save the rest")
        owners.append((owner, kind))
    ops = {k for _, kind in owners for k in _OWN_OPS[kind]}
    if any(op not in ops for op in s.ops):
        return [], (f"'{s.param}' is consumed by {sorted(set(s.ops) - ops)} (its parent module's own computation, e.g. "
                    "MultiheadAttention reading out_proj.weight), not by its module's call, which is what PEFT adapts: "
                    f"the file would compute something else. Leave it out with exclude=['{s.param}'] to save the rest")
    for prefix, _, rec, a in adapter_records(model):
        if a is not s.module or rec.adapter != s.adapter:
            continue
        holder = model.get_submodule(prefix[:-1]) if prefix else model
        leaf = peft_kind(holder) is not None and rec.param == "weight"  # a captured leaf: its own weight
        graph = (region_of(holder) or holder).graph  # a module that kept its class runs its region's graph
        nodes = {n.name: n for n in graph.nodes}
        for node, op, _ in rec.consumers:
            n = nodes.get(node)
            if not leaf and getattr(n, "op", None) == "get_attr" and not _inside_owner(n):
                return [], (f"'{s.param}' is also read outside its module's forward (by {op}, graph node {node!r}), "
                            "and PEFT adapts module calls only: the file would compute something else. Leave it out "
                            f"with exclude=['{s.param}'] (or untie the weight) to save the rest")
    return owners, None


def _modules_to_save(model: nn.Module, adapter: str, extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """Modules written as PEFT ``modules_to_save``: owners of the adapter's ``trainable=``
    parameters and the modules ``extra`` patterns name; and every problem."""
    problems, names = [], []
    for n in trainable_params(model, [adapter]):
        owner = n.rpartition(".")[0]
        if not owner:
            problems.append(f"'{n}' is trained in full but is a parameter of the root module; PEFT's modules_to_save "
                            "saves submodules only")
        elif owner not in names:
            names.append(owner)
    mods = [n for n, _ in model.named_modules() if n and not is_adapter_path(n)]
    for pat in extra:
        hit = [n for n in mods if fnmatch.fnmatchcase(n, pat)]
        if not hit:
            problems.append(f"modules_to_save pattern {pat!r} matches no module")
        names += [n for n in hit if n not in names]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]
    for n in names:  # PEFT wraps every module whose name ends with a modules_to_save entry
        also = [m for m in mods if m.endswith(n) and m not in names and not any(m.startswith(o + ".") for o in names)]
        if also:
            problems.append(f"modules_to_save entry '{n}' also matches {also[:4]} under PEFT's rule (every module whose "
                            "name ends with it), so PEFT would replace those too")
    return names, problems


def save_adapter(gm: nn.Module, directory: Union[str, os.PathLike], *, adapter: str = "default",
                 base_model_name_or_path: Optional[str] = None, modules_to_save: Sequence[str] = ()) -> Path:
    """Write adapter ``adapter`` of ``gm`` in HF PEFT's format: ``directory/adapter_model.safetensors``
    and ``directory/adapter_config.json``; ``peft.PeftModel.from_pretrained(base_model, directory)``
    (and :func:`load_adapter`) reproduce ``gm``'s outputs with that adapter active.  Each file is
    written atomically.

    The file holds the adapter as it computes (:func:`lora_fx.io._peft_layout.peft_factors`): at
    its effective rank (zero padding from :func:`lora_fx.reserve_rank_` or a lower-rank load
    dropped), fused per-block adapters as one block-diagonal pair, PiSSA re-expressed on the
    original weight, the mixing weight folded into ``lora_alpha``; the enabled flag is not saved
    (PEFT activates what it loads).  A tied weight is saved once per module whose call consumes
    it (e.g. GPT-2's ``transformer.wte`` and ``lm_head``).  ``target_modules`` is an anchored
    regular expression naming exactly the adapted modules; ranks and alphas that differ from the
    most common one go to ``rank_pattern`` / ``alpha_pattern`` (anchored keys).  Base parameters
    trained in full with the adapter (``trainable=``) and the modules named by ``modules_to_save``
    are saved as PEFT's ``modules_to_save`` (their parameters and buffers); other buffers that
    training changed cannot be in the file: a :class:`~lora_fx.errors.LoraFxWarning` names them.

    Args:
        gm: an adapted module (or a compiled / DDP wrapper of one).
        directory: output folder (created).
        adapter: adapter name.
        base_model_name_or_path: recorded in the config (PEFT's field), optional.
        modules_to_save: fnmatch patterns of more modules to save whole (e.g. BatchNorm layers
            whose running statistics changed).

    Returns:
        ``Path(directory)``.

    Raises:
        UnknownAdapterError: unknown adapter name.
        ConfigError: a PiSSA adapter with DoRA.
        UnsupportedSiteError: what PEFT's format cannot express, all listed: a parameter of the
            model root, a parameter other than a module's ``weight`` of a Linear, Embedding,
            ungrouped ConvNd or GPT-2 Conv1D (a 2-D parameter of any other module is a
            ``target_parameters`` entry, unless read outside its module's call), a weight of
            3 or more dimensions in a module of another type; a weight also read outside its module's call (e.g. a tied
            head computed with ``F.linear``); DoRA on Embedding / Conv1D (PEFT normalises along
            the other axis) or with a mixing weight other than 1; a mixing weight of 0; a
            ``modules_to_save`` entry PEFT's suffix rule would also apply to other modules.
        AdapterFileError: ``directory`` is an existing file, or below a file.
    """
    out = dir_target(directory, what="save_adapter", other="lora_fx.io.save_lora_state(model, path)")
    model = unwrap(gm)
    check_adapter_names(model, [adapter])
    cfg = configs_of(model).get(adapter)
    chosen = [s for s in sites(model) if s.adapter == adapter]
    pissa = [s for s in chosen if hasattr(s.module, PISSA_BUFFERS[0])]
    if pissa and any(s.module.use_dora for s in pissa):
        raise ConfigError(
            f"adapter {adapter!r} combines PiSSA and DoRA: its base is the residual W - s·B0@A0 held in this "
            "module, and DoRA's normalisation does not let it be re-expressed on the original W. Save "
            "lora_fx.fold(gm) as a full model instead.")
    problems, entries = [], []
    names_of: dict[int, list[str]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        if not is_adapter_path(n):
            names_of.setdefault(id(m), []).append(n)
    for s in chosen:
        m = s.module
        if getattr(m, "experts", None) is not None:  # a stack of expert weights: PEFT's target_parameters
            if len(s.aliases) > 1:
                problems.append(f"'{s.param}' is tied to {list(s.aliases[1:])}: PEFT adapts parameters by name")
            elif m.mix == 0.0:
                problems.append(_switched_off(s))
            else:
                a, b, r, alpha = peft_experts.expert_factors(m)
                entries.append((s.param, "experts", s, a, b, r, alpha))
            continue
        owner_path, _, pname = s.param.rpartition(".")
        holder = model.get_submodule(owner_path) if owner_path else model
        if peft_kind(holder) is None and len(s.shape) == 2 and len(s.aliases) == 1 and owner_path:
            # a 2-D parameter of a module PEFT has no layer for (a MoE router): target_parameters
            why = _read_outside(model, s, owner_path) or (
                f"'{s.param}' ({type(holder).__name__}.{pname}) uses DoRA: PEFT's target_parameters adapters take none"
                if m.use_dora else _switched_off(s))
            if why:
                problems.append(why)
            else:
                a, b, r, alpha = peft_factors(m)
                entries.append((s.param, "param", s, a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1), r, alpha))
            continue
        owners, why = _owners(model, s, names_of)
        if why:
            problems.append(why)
        elif m.use_dora and any(kind in ("embedding", "conv1d_gpt2") for _, kind in owners):
            problems.append(f"'{s.param}' uses DoRA on an Embedding / Conv1D: PEFT normalises this layout along the "
                            "other axis, so the file would compute something else")
        elif m.use_dora and m.mix != 1.0:
            problems.append(f"'{s.param}': DoRA adapter with mixing weight {m.mix} (which gates DoRA's normalised "
                            "weight, not a scaling PEFT can hold); set_scale_(gm, 1.0) before saving")
        elif m.mix == 0.0:
            problems.append(_switched_off(s))
        else:
            a, b, r, alpha = peft_factors(m)
            entries += [(owner, kind, s, a, b, r, alpha) for owner, kind in owners]
    saved, more = _modules_to_save(model, adapter, modules_to_save)
    problems += more
    if problems:
        raise mismatch_error(f"adapter {adapter!r} cannot be written in PEFT's format", problems,
                             outcome="nothing was written", error=UnsupportedSiteError,
                             hint="Fixes: lora_fx's own format holds every site (lora_fx.io.save_lora_state(model, "
                                  "path), loaded by load_lora_state or load_adapter); or leave those weights out of "
                                  "PEFT's reach when you transform (exclude=[...]) and train again.")
    left = [b for b in changed_buffers(model) if not any(b.startswith(n + ".") for n in saved)]
    if left:
        owners_ = sorted({b.rpartition(".")[0] for b in left})
        warnings.warn(f"{len(left)} buffer(s) changed since transform and are not in the PEFT file: {left[:8]}"
                      f"{' ...' if len(left) > 8 else ''}. PEFT files carry buffers only inside modules_to_save: pass "
                      f"save_adapter(..., modules_to_save={owners_[:8]}) to save them (PEFT restores them), or save "
                      "lora_fx's own file (lora_fx.io.save_lora_state), which carries them", LoraFxWarning, stacklevel=2)
    tensors: dict[str, torch.Tensor] = {}
    stacks = [e for e in entries if e[1] in ("experts", "param")]  # PEFT's target_parameters
    prefixes = peft_experts.key_prefixes(model, [e[0] for e in stacks])
    for owner, kind, s, a, b, _, _ in entries:
        if kind in ("experts", "param"):
            la, lb = peft_experts.to_peft(a, b) if kind == "experts" else (a, b)
            tensors[prefixes[owner] + "lora_A.weight"] = la.contiguous().clone()
            tensors[prefixes[owner] + "lora_B.weight"] = lb.contiguous().clone()
            continue
        for key, t in to_peft(kind, a, b, s.shape).items():
            tensors[f"{PEFT_PREFIX}{owner}.{key}"] = t.contiguous().clone()
        if s.module.use_dora:
            shape = expected_shapes(kind, s.shape, a.shape[0], True)["lora_magnitude_vector"]
            tensors[f"{PEFT_PREFIX}{owner}.lora_magnitude_vector"] = \
                s.module.lora_magnitude.detach().reshape(shape).contiguous().clone()
    for name in saved:
        for k, v in model.get_submodule(name).state_dict().items():
            if not is_adapter_path(k) and not is_lora_key(k):
                tensors[f"{PEFT_PREFIX}{name}.{k}"] = v.detach().contiguous().clone()
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
        "target_modules": "^(?:" + "|".join(re.escape(e[0]) for e in entries if e[1] not in ("experts", "param")) + ")$"
                          if len(stacks) < len(entries) else [],
        "exclude_modules": None,
        "rank_pattern": {_exact(e[0]): e[5] for e in entries if e[5] != r0},
        "alpha_pattern": {_exact(e[0]): e[6] for e in entries if e[6] != a0},
        "use_rslora": bool(first.use_rslora),
        "use_dora": bool(first.use_dora),
        "lora_dropout": _dropout(first, stacks),
        "fan_in_fan_out": any(e[1] == "conv1d_gpt2" for e in entries),
        "bias": "none",
        "init_lora_weights": True,
        "modules_to_save": saved or None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if stacks:
        config["target_parameters"] = sorted(e[0] for e in stacks)
    out.mkdir(parents=True, exist_ok=True)
    meta = {FILE_META["adapter"]: adapter}
    if cfg is not None:
        meta[FILE_META["config"]] = cfg.to_json()
    atomic_write_bytes(out / WEIGHTS_NAME, safetensors_bytes(tensors, meta, file_format="pt"))
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out


def _dropout(adapter, stacks) -> float:
    p = float(getattr(getattr(adapter, "dropout", None), "p", 0.0))
    if p and stacks:  # PEFT's target_parameters wrapper refuses dropout: the file would not load
        warnings.warn(f"PEFT's target_parameters adapters take no LoRA dropout; the file records lora_dropout=0.0 "
                      f"instead of {p} (dropout only acts in training)", LoraFxWarning, stacklevel=3)
        return 0.0
    return p


# ---------------------------------------------------------------------------------------------
# load



def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], *, adapter_name: str = "default",
                 activate: bool = True, **capture) -> nn.Module:
    """Load a LoRA adapter saved by HF PEFT (``save_pretrained``) or :func:`save_adapter`.

    * ``model`` is a plain module: returns ``lora_fx.transform(model, ...)`` with the adapter
      (``model`` is untouched);
    * ``model`` is a lora_fx module (or a compiled / DDP wrapper of one): adds adapter
      ``adapter_name`` to it in place (or, when an adapter of that name already adapts exactly the
      file's modules with the same ranks, loads the values into it) and returns it.

    Scaling is PEFT's: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``), per-module
    ``rank_pattern`` / ``alpha_pattern`` resolved as PEFT does.  Modules sharing one weight (tied
    embeddings) get one adapter and must carry the same update.  ``modules_to_save`` entries (e.g.
    a trained classification head) are loaded into those modules, whose parameters then train in
    full with the adapter (``trainable=``).  Base weights PEFT saves next to embedding layers
    (``base_layer.weight``) must equal the model's.  The contract of every loader
    (:mod:`lora_fx.io._files`): everything is checked before anything changes, and on error the
    model is exactly as before.

    Args:
        model: the base model (same architecture as the one the adapter was trained on).
        directory: folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
        adapter_name: name of the adapter in lora_fx.
        activate: make it the only active adapter (as ``PeftModel.from_pretrained``; note that
            :func:`lora_fx.add_adapter` leaves a new adapter inactive instead).
        **capture: for a plain ``model``, :func:`lora_fx.transform`'s capture keywords
            (``frontend``, ``example_inputs``, ``example_kwargs``, ``dynamic_shapes``, ``blocks``,
            ``leaf_modules``, ``concrete_args``, ``copy_weights``) and ``adapter_dtype`` (the new
            adapter's factors are otherwise in the file's dtype).

    Raises:
        AdapterFileError: a file is missing, corrupt (a checksum lora_fx wrote does not match), or
            only a pickled ``adapter_model.bin`` exists; ``directory`` is a file or does not exist.
        ConfigError: not a LoRA adapter, or PEFT options lora_fx does not load (trained biases,
            ``trainable_token_indices``).
        AdapterMismatchError: one error listing every target module that is missing from the model,
            of another type, or whose tensors have other shapes or dtypes; tied modules with
            different updates; base weights that differ from the model's; ``modules_to_save``
            entries that do not fit; an existing adapter ``adapter_name`` with other targets.
    """
    directory = dir_source(directory, what="load_adapter", other="lora_fx.io.load_lora_state(model, path)")
    config, tensors = read_peft_dir(directory)
    check_peft_config(config, directory)
    target = unwrap(model)
    adapted = is_adapted(target)
    stacks, tensors, problems = peft_experts.plan_experts(target, config, tensors)  # target_parameters
    plan = plan_peft(target, config, tensors) if tensors or not stacks else Plan()
    problems += plan.problems
    dora = bool(config.get("use_dora", False))
    full = [f"{m}.{k}" for m, sd in plan.saved.items() for k, _ in target.get_submodule(m).named_parameters()]
    exists = adapted and adapter_name in adapter_names(target)
    if exists and not problems:
        have = {alias: (s.rank, s.alpha, s.module.use_dora) for s in sites(target) if s.adapter == adapter_name
                for alias in s.aliases}
        want = {p: (t.rank, t.alpha, dora) for t in plan.targets for p in t.params}
        want.update({t.param: (t.rank, t.alpha, False) for t in stacks})
        if have != want:
            problems.append(f"adapter {adapter_name!r} already exists with (rank, alpha, dora) per target {have}, "
                            f"the file has {want}; pass another adapter_name= or delete_adapter() first")
        missing = sorted(set(full) - set(trainable_params(target, [adapter_name])))
        if missing:
            problems.append(f"the file's modules_to_save {sorted(plan.saved)} hold parameters {missing} that adapter "
                            f"{adapter_name!r} does not train; delete_adapter() first or load into the base model")
    elif adapted and plan.saved:
        problems.append(f"the file's modules_to_save {sorted(plan.saved)} would replace base parameters shared by every "
                        f"adapter of this model ({adapter_names(target)}); load it into the base model instead")
    if problems:
        raise mismatch_error(f"adapter in '{directory}' does not fit {type(target).__name__}", problems)
    if not plan.targets and not stacks:
        raise AdapterMismatchError(f"adapter in '{directory}' holds no LoRA layer, only modules_to_save "
                                   f"{sorted(plan.saved)}; lora_fx loads LoRA adapters")
    named = [(p, t.rank, t.alpha) for t in plan.targets for p in t.params] + [(t.param, t.rank, t.alpha) for t in stacks]
    cfg = LoraConfig(
        rank=named[0][1], alpha=named[0][2],
        targets=tuple(n for n, _, _ in named),
        rank_pattern={n: r for n, r, _ in named},
        alpha_pattern={n: a for n, _, a in named},
        use_rslora=bool(config.get("use_rslora", False)), use_dora=dora,
        fused={t.param: None for t in stacks if t.lora_A.dim() == 2},  # one pair, as PEFT's (MHA's in_proj_weight)
        dropout=float(config.get("lora_dropout", 0.0) or 0.0),
        trainable=tuple(m for m in plan.saved if next(target.get_submodule(m).parameters(), None) is not None) or None)
    with torch.no_grad(), Rollback() as undo:
        if not adapted:
            gm = transform(target, config=cfg, adapter_name=adapter_name, **capture)
        else:
            gm = target
            for _, _, a in named_adapters(gm):
                undo.attrs(a, ADAPTER_STATE)
            if not exists:
                add_adapter(gm, adapter_name, config=cfg)
                undo.call(lambda: delete_adapter(gm, adapter_name))
        by_alias = {alias: s.module for s in sites(gm) if s.adapter == adapter_name for alias in s.aliases}
        for t in plan.targets:
            mod = by_alias[t.params[0]]
            a, b = from_peft(t.kind, t.tensors)
            a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
            r = a.shape[0]
            for p in (mod.lora_A, mod.lora_B) + ((mod.lora_magnitude,) if mod.use_dora else ()):
                undo.tensor(p)
            mod.lora_A[:r].copy_(a)
            mod.lora_A[r:].zero_()
            mod.lora_B[:, :r].copy_(b)
            mod.lora_B[:, r:].zero_()
            if mod.use_dora:
                mod.lora_magnitude.copy_(t.tensors["lora_magnitude_vector"].reshape(-1))
        for t in stacks:
            mod = by_alias.get(t.param)
            if t.lora_A.dim() == 2:  # a 2-D parameter (a router's gate.weight)
                if mod is None or mod.experts is not None or mod.lora_A.shape[0] < t.rank \
                        or tuple(mod.lora_A.shape[1:]) != tuple(t.lora_A.shape[1:]) \
                        or mod.lora_B.shape[0] != t.lora_B.shape[0]:
                    raise AdapterMismatchError(
                        f"adapter in '{directory}': '{t.param}' is not adapted with lora_A {tuple(t.lora_A.shape)} / "
                        f"lora_B {tuple(t.lora_B.shape)} in {type(gm).__name__}; nothing was loaded")
                for p in (mod.lora_A, mod.lora_B):
                    undo.tensor(p)
                mod.lora_A[:t.rank].copy_(t.lora_A.reshape(t.rank, -1))
                mod.lora_A[t.rank:].zero_()
                mod.lora_B[:, :t.rank].copy_(t.lora_B.reshape(t.lora_B.shape[0], -1))
                mod.lora_B[:, t.rank:].zero_()
                continue
            if mod is None or mod.experts is None or tuple(mod.lora_A.shape[::2]) != tuple(t.lora_A.shape[::2]) \
                    or tuple(mod.lora_B.shape[:2]) != tuple(t.lora_B.shape[:2]) or mod.lora_A.shape[1] < t.rank:
                raise AdapterMismatchError(
                    f"adapter in '{directory}': '{t.param}' is not adapted as a stack of expert weights with "
                    f"lora_A {tuple(t.lora_A.shape)} / lora_B {tuple(t.lora_B.shape)} in {type(gm).__name__} (its "
                    "experts module's code is not one lora_fx reads as expert stacks); nothing was loaded")
            r = t.rank
            undo.tensor(mod.lora_A)
            undo.tensor(mod.lora_B)
            mod.lora_A[:, :r].copy_(t.lora_A)
            mod.lora_A[:, r:].zero_()
            mod.lora_B[..., :r].copy_(t.lora_B)
            mod.lora_B[..., r:].zero_()
        for m, entries in plan.saved.items():
            own = gm.get_submodule(m).state_dict(keep_vars=True)
            for k, v in entries.items():
                undo.tensor(own[k]).copy_(v.to(own[k].dtype))
        if activate:
            set_active_adapters(gm, [adapter_name])
        loaded = {name for name, _, _ in named_adapters(gm)}
        wanted = [p for t in plan.targets for p in t.params] + [t.param for t in stacks]
        if adapter_name not in loaded or not all(p in by_alias for p in wanted):
            raise AdapterMismatchError(f"adapter in '{directory}': {len(plan.targets) + len(stacks)} targets in the "
                                       f"file, {len(by_alias)} adapted sites in the model; nothing was loaded")
    if plan.unmatched:
        n = len(plan.unmatched)
        warnings.warn(f"the adapter in '{directory}' names {n} module(s) by its target_modules that it holds no "
                      f"tensors for: {plan.unmatched[:6]}{' ...' if n > 6 else ''}. They are not adapted (PEFT would "
                      "give them fresh adapters); the file was probably saved from a model with fewer layers",
                      LoraFxWarning, stacklevel=2)
    return model if adapted else gm
