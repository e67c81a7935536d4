"""Public entry points: :func:`transform`, :func:`fold`, :func:`sites`."""

from __future__ import annotations

import collections
import copy
import dataclasses
import fnmatch
from typing import Any, Optional, Sequence, Union

from torch import fx, nn

from .adapters.module import LoraAdapter
from .config import LoraConfig, as_patterns
from .graph_module import compile_stale, deferred_recompile, graph_modules
from .adapters.init import check_pissa, new_adapter
from .errors import AlreadyAdaptedError, ConfigError, TargetError, UnsupportedSiteError
from .state import (CONFIG_ATTR, FOLD_META, OWNS_WEIGHTS_ATTR, Site, is_adapted, record_config_,
                    require_adapted, sites)

__all__ = ["transform", "fold", "sites", "Site", "CONFIG_ATTR", "OWNS_WEIGHTS_ATTR"]

class _Unset:
    """Default of a ``transform``/``add_adapter`` keyword: take the value from ``config`` (or the
    :class:`~lora_fx.config.LoraConfig` default).  Shown as such by ``help()`` and ``inspect``."""

    def __repr__(self) -> str:
        return "<from config>"

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return "_UNSET"  # pickles as a reference to the one sentinel


_UNSET: Any = _Unset()
_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(LoraConfig) if f.name != "version")


def _passes():
    from lora_fx.passes import find_sites, insert_lora, trace_fx  # installed as lora_fx.passes
    return trace_fx, find_sites, insert_lora


def _copy_model(model: nn.Module, copy_weights: bool) -> nn.Module:
    memo: dict[int, Any] = {}
    for m in model.modules():  # every module's empty hook dicts and sets: made here, not via __reduce_ex__
        for v in m.__dict__.values():
            if (type(v) is collections.OrderedDict and not v and not v.__dict__) or (type(v) is set and not v):
                memo[id(v)] = type(v)()
    if not copy_weights:
        for p in model.parameters():  # each Parameter object once; ties map to one copy
            memo[id(p)] = nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as exc:
        raise ConfigError(
            f"could not copy {type(model).__name__} (lora_fx never modifies your model, so it works on a "
            f"copy): {type(exc).__name__}: {exc}. Make the model deep-copyable (drop open files, locks or "
            "generators held as attributes).") from exc
    compile_stale(copied)  # GraphModules in the model: copied inside transform's deferred_recompile block
    return copied


def _select(consumers, targets, exclude):
    names = sorted({c.fqn for c in consumers})
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    if targets is not None and not targets:
        raise TargetError("targets is empty, so nothing would be adapted; pass targets=None to adapt every "
                          f"supported weight, or name some. Candidates: {shown}")
    if targets is None:
        chosen = [c for c in consumers if c.default]
    else:
        chosen, seen = [], set()
        for pat in targets:
            hit = [c for c in consumers if fnmatch.fnmatchcase(c.fqn, pat)]
            if not hit:
                raise TargetError(f"targets pattern {pat!r} matches no parameter consumed by the model's "
                                  f"forward. Candidates: {shown}")
            bad = [c for c in hit if c.reason is not None]
            if bad and (len(bad) == len(hit) or not any(ch in pat for ch in "*?[")):
                c = bad[0]
                raise UnsupportedSiteError(
                    f"cannot adapt '{c.fqn}' (used by {c.op}): {c.reason}. Remove it from targets, or "
                    "target a weight matrix instead.")
            new = [c for c in hit if c.reason is None and id(c) not in seen]  # O(n): no list scans
            seen.update(id(c) for c in new)
            chosen.extend(new)
    if exclude is not None:
        for pat in exclude:
            if not any(fnmatch.fnmatchcase(c.fqn, pat) for c in consumers):
                raise TargetError(f"exclude pattern {pat!r} matches no parameter consumed by the model's "
                                  f"forward. Candidates: {shown}")
        chosen = [c for c in chosen if not any(fnmatch.fnmatchcase(c.fqn, p) for p in exclude)]
    if not chosen:
        raise TargetError("no site to adapt: " + (
            "the model has no supported weight (linear, conv, conv_transpose, embedding, matmul, "
            f"attention). Name parameters explicitly with targets=[...]. Candidates: {shown}"
            if targets is None else f"exclude removed every target. Candidates: {shown}"))
    return chosen


def transform(
    model: nn.Module,
    rank: int = _UNSET,
    *,
    alpha: Optional[float] = _UNSET,
    targets: Union[None, str, Sequence[str]] = _UNSET,
    exclude: Union[None, str, Sequence[str]] = _UNSET,
    rank_pattern: Optional[dict] = _UNSET,
    alpha_pattern: Optional[dict] = _UNSET,
    use_rslora: bool = _UNSET,
    use_dora: bool = _UNSET,
    init: str = _UNSET,
    dropout: float = _UNSET,
    lowering: str = _UNSET,
    recompute_inputs: bool = _UNSET,
    adapter_dtype: Optional[str] = _UNSET,
    fused: Optional[dict] = _UNSET,
    config: Optional[LoraConfig] = None,
    adapter_name: str = "default",
    blocks: Union[None, str, Sequence[str]] = None,
    leaf_modules: Union[None, str, Sequence[str]] = None,
    concrete_args: Optional[dict[str, Any]] = None,
    copy_weights: bool = True,
    frontend: str = "auto",
    example_inputs: Any = None,
    example_kwargs: Optional[dict[str, Any]] = None,
    dynamic_shapes: Any = None,
    **unknown: Any,
) -> fx.GraphModule:
    """Trace ``model`` and return a new ``GraphModule`` in which every targeted weight ``W`` is
    seen by its op as ``W + ΔW``, ``ΔW = scaling · (lora_B @ lora_A).reshape(W.shape)``
    (Hu et al., 2022, eq. 3), ``scaling = alpha / rank``.

    ``lora_A: (rank, W[0].numel())`` starts kaiming-uniform, ``lora_B: (W.shape[0], rank)`` starts
    at zero, so the result computes exactly what ``model`` computes until trained.  Only the
    adapters are trainable; base parameters are frozen copies (``copy_weights=False`` shares their
    storage instead, to save memory).  ``model`` is never modified.

    Args:
        model: any ``nn.Module`` torch.fx can trace (blocks in ``nn.ModuleList`` s are traced
            one by one and stay called submodules), or, given example inputs, that
            ``torch.export`` can capture (see ``frontend``).
        rank: ``r > 0`` (default 16).  A rank above ``min(fan_out, fan_in)`` of a targeted weight
            is allowed (the update is then full-rank) and warns with :class:`LoraFxWarning`.
        alpha: ``> 0``; default ``rank`` (scaling 1.0).
        targets: fnmatch patterns over fully qualified parameter names, e.g.
            ``"layers.*.attn.*.weight"``; ``None``: every weight of linear, conv, conv-transpose,
            embedding, matmul and attention sites.
        exclude: patterns removed from targets (exclude wins).
        rank_pattern, alpha_pattern, use_rslora, use_dora, init, dropout, lowering, recompute_inputs,
            adapter_dtype: see
            :class:`~lora_fx.config.LoraConfig` (these keywords override ``config``).
        fused: ``{pattern: spec}``: per-block adapters on weights whose output rows are blocks,
            e.g. ``{"*.qkv.weight": {"blocks": {"q": 64, "k": 16, "v": 16}, "enable": ("q", "v")}}``
            (see :mod:`lora_fx.fused`; MHA ``in_proj_weight`` is q, k, v blocks by default).
        config: a :class:`~lora_fx.config.LoraConfig`.
        adapter_name: name of the adapter (``"default"``); add more with
            :func:`lora_fx.adapters.add_adapter`.
        blocks: patterns of extra modules to keep as separately traced, called submodules.
        leaf_modules: patterns of modules to keep opaque (not traced through).
        concrete_args: as in ``torch.fx.symbolic_trace``.
        copy_weights: copy base weights (default) or share their storage with ``model``
            (``init="pissa"`` needs the copy: it writes its residual into the module's own ``W``).
        frontend: ``"auto"`` (torch.fx symbolic tracing; when it fails and example inputs are
            given, ``torch.export``), ``"fx"`` or ``"export"`` (see :mod:`lora_fx.passes.capture`).
        example_inputs: tuple of positional example arguments for the export front-end (a single
            tensor is wrapped); sizes are dynamic unless ``dynamic_shapes`` says otherwise.
        example_kwargs: keyword example arguments for the export front-end.
        dynamic_shapes: as ``torch.export.export``'s (default: ``Dim.AUTO`` for every dimension;
            ``False``: static, the result then only runs on the example sizes).

    Returns:
        ``torch.fx.GraphModule`` whose ``state_dict()`` has ``model``'s keys and values plus
        ``*.lora.<adapter_name>.<param>.lora_A`` / ``.lora_B``.

    Raises:
        ConfigError: invalid rank, alpha, dropout, lowering, ... or an unknown keyword.
        TargetError: a targets/exclude pattern matches nothing (the message lists candidates).
        UnsupportedSiteError: ``targets`` names a parameter that cannot be adapted.
        AlreadyAdaptedError: ``model`` already carries lora_fx adapters (use ``add_adapter``).
        TraceError: the front-end cannot capture the model (names the module, line and the
            fixes; with ``frontend="auto"`` both failures, shortest first).
    """
    if unknown:
        raise ConfigError(f"transform() got unknown keyword(s) {sorted(unknown)}; valid keywords: "
                          f"{sorted(_CONFIG_KEYS + ('config', 'adapter_name', 'blocks', 'leaf_modules', 'concrete_args', 'copy_weights', 'frontend', 'example_inputs', 'example_kwargs', 'dynamic_shapes'))}")
    check_adapter_name(adapter_name)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"transform() needs an nn.Module, got {type(model).__name__}")
    given = {k: v for k, v in dict(rank=rank, alpha=alpha, targets=targets, exclude=exclude,
                                     rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
                                     use_rslora=use_rslora, use_dora=use_dora, init=init, dropout=dropout,
                                     lowering=lowering, recompute_inputs=recompute_inputs,
                                     adapter_dtype=adapter_dtype, fused=fused).items()
             if v is not _UNSET}
    cfg = (config or LoraConfig()).replace(**given) if given else (config or LoraConfig())
    if is_adapted(model):
        raise AlreadyAdaptedError(
            f"{type(model).__name__} already carries lora_fx adapters; transforming it again would stack a "
            "second adapter silently. Train it as is, call lora_fx.fold(model) first, or add a named adapter "
            "with lora_fx.add_adapter(model, name, ...).")
    from lora_fx.passes.capture import capture
    with deferred_recompile():  # each GraphModule generates its code once, after the rewrite
        root = capture(model, lambda: _copy_model(model, copy_weights), frontend=frontend,
                       example_inputs=example_inputs, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
                       trace_kwargs=dict(blocks=as_patterns(blocks, "blocks") or (),
                                         leaf_modules=as_patterns(leaf_modules, "leaf_modules") or (),
                                         concrete_args=concrete_args))
        setattr(root, OWNS_WEIGHTS_ATTR, bool(copy_weights))
        return _adapt(root, cfg, adapter_name)


def check_adapter_name(name) -> str:
    """``name`` if it can name an adapter (a non-empty identifier: it becomes a module path part).

    Raises:
        ConfigError: otherwise."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"adapter name must be a non-empty Python identifier (it becomes part of parameter "
                          f"names like 'fc.lora.<name>.weight.lora_A'), got {name!r}")
    return name


def _adapt(root: fx.GraphModule, cfg: LoraConfig, adapter_name: str) -> fx.GraphModule:
    """Find sites, create adapters and lower them on a traced hierarchy the caller owns."""
    _, find_sites, insert_lora = _passes()
    consumers = find_sites.find_sites(root)
    chosen = _select(consumers, cfg.targets, cfg.exclude)
    if cfg.init == "pissa":
        check_pissa(root, consumers, chosen)
    for what, patterns in (("rank_pattern", cfg.rank_pattern), ("alpha_pattern", cfg.alpha_pattern),
                           ("fused", cfg.fused)):
        for pat in patterns:
            if not any(fnmatch.fnmatchcase(c.fqn, pat) for c in chosen):
                raise TargetError(f"{what} key {pat!r} matches no targeted parameter; targeted: "
                                  f"{sorted({c.fqn for c in chosen})}")

    gms = dict(graph_modules(root))  # once: per-adapter lookups stay O(1)

    def make_adapter(c) -> LoraAdapter:
        return new_adapter(c, gms[c.gm_path].get_parameter(c.param), cfg)

    insert_lora.insert_lora(root, chosen, make_adapter, adapter_name=adapter_name, lowering=cfg.lowering,
                            recompute_inputs=cfg.recompute_inputs)
    record_config_(root, adapter_name, cfg)
    adapters = {id(p) for m in root.modules() if isinstance(m, LoraAdapter) for p in m.parameters()}
    for p in root.parameters():
        p.requires_grad_(id(p) in adapters)
    return root


def fold(gm: nn.Module) -> fx.GraphModule:
    """A new module with every active adapter folded into its weight: ``W ← W + ΔW`` computed in
    float32 (or wider) and rounded once to ``W``'s dtype; no adapter nodes or parameters remain.

    ``fold(gm).state_dict()`` has the original model's keys, so it loads with ``strict=True`` into
    a fresh instance of the original class.  ``gm`` is not modified.  ``result.meta["lora_fx"]``
    holds ``{"folded": [names], "untied": [names]}``: a weight tied to an unadapted alias gets its
    own folded tensor and is listed under ``"untied"``.

    Raises:
        NotAdaptedError: ``gm`` was not produced by :func:`transform` (or is already folded).
    """
    require_adapted(gm, "fold", detail=" (already folded, or never transformed), so there is nothing to fold")
    from lora_fx.passes.fold import fold_graph_modules
    folded, info = fold_graph_modules(gm)
    if hasattr(folded, CONFIG_ATTR):
        delattr(folded, CONFIG_ATTR)
    folded.meta[FOLD_META] = info
    return folded
