"""Several named adapters on one adapted module: add, activate, mix, disable, delete.

Every switch here only writes adapter attributes and refills each adapter's ``scaling`` buffer in
place (:meth:`LoraAdapter.refresh_scaling_`): the graph is never re-traced
and a ``torch.compile`` d module does not recompile.  Adding or deleting an adapter edits the
graph (new or removed nodes), so a compiled module recompiles once after those.

Names and semantics follow HF PEFT where it has them (``add_adapter``, ``set_adapter``,
``delete_adapter``, ``disable_adapter``; ``add_weighted_adapter``'s ``"linear"`` combination).
"""

from __future__ import annotations

import warnings
from typing import Mapping, Optional, Sequence, Union

from torch import nn

from lora_fx.passes.find_sites import find_sites
from lora_fx.passes.insert_lora import insert_lora
from lora_fx.passes.remove_lora import remove_lora_
from lora_fx.passes.route_quantized import prepare_quantized_

from ..config import UNSET, LoraConfig, config_with, unknown_keywords_message
from ..errors import ConfigError, LoraFxWarning, TargetError
from ..state import (adapter_names, adapter_records, check_adapter_names, forget_config_, iter_adapters, policy_of,
                     record_config_, record_left_out_, record_trainable_, regions, require_adapted, state_of,
                     trainable_params)
from ..targets import apply_policy, check_adapter_name, check_patterns, find_left_out, select_targets, select_trainable
from .hotswap import disable_adapters  # one implementation, re-exported here
from .init import check_pissa, new_adapter
from .module import LoraAdapter

__all__ = [
    "adapt_",
    "add_adapter",
    "adapter_names",
    "active_adapters",
    "set_active_adapters",
    "set_adapter_weights",
    "disable_adapters",
    "delete_adapter",
    "named_adapters",
]


def adapt_(root: nn.Module, config: LoraConfig, adapter_name: str) -> nn.Module:
    """The pipeline after capture, on a captured model the caller owns (a ``GraphModule``
    hierarchy or a model with regions: the copy :func:`lora_fx.transform` captured, or the module
    :func:`add_adapter` extends); returns ``root``.

    prepare quantized modules (:mod:`lora_fx.passes.route_quantized`) → find sites
    (:mod:`lora_fx.passes.find_sites`, pure analysis) and apply the default-target policy recorded
    at capture → select targets (:mod:`lora_fx.targets`) → make one adapter per targeted weight
    (:func:`.init.new_adapter`) and insert its merge / factored nodes
    (:mod:`lora_fx.passes.insert_lora`) → record the config, the weights trained in full and the
    weights left out
    (:mod:`lora_fx.state`).  ``requires_grad`` is left to the caller.

    Warns:
        LoraFxWarning: once, listing every weight-like parameter (floating point, at least 2-D)
            left out other than by the user's ``targets`` / ``exclude``, each with the reason
            (also in :func:`lora_fx.left_out` and :func:`lora_fx.summary`).

    Raises:
        TargetError, UnsupportedSiteError: as :func:`lora_fx.transform`.
        ConfigError: ``init="pissa"`` where it cannot write the weight.
    """
    prepare_quantized_(root)  # quantized bases: modules' prepare hooks, linears on the frozen-base op
    policy = policy_of(root)
    consumers = apply_policy(find_sites(root), policy)
    chosen = select_targets(consumers, config.targets, config.exclude, policy=policy, root=root)
    trainable = select_trainable(root, config.trainable)
    gms = dict(regions(root))  # once: per-adapter lookups stay O(1)
    if trainable:  # trained in full: no adapter on them (explicitly targeted: a conflict)
        full = {id(root.get_parameter(n)) for n in trainable}
        both = sorted({c.fqn for c in chosen if id(gms[c.gm_path].get_parameter(c.param)) in full})
        if both and config.targets is not None:
            raise ConfigError(f"{both} are both LoRA targets and trainable (trained in full); a weight is one or the "
                              "other: remove them from targets or from trainable")
        chosen = [c for c in chosen if c.fqn not in both]
        if not chosen:
            raise TargetError(f"trainable={list(config.trainable)} covers every default target, so no adapter is left; "
                              "name the weights to adapt with targets=[...]")
    if config.init == "pissa":
        check_pissa(root, consumers, chosen)
    check_patterns(config, chosen)
    insert_lora(root, chosen, lambda c: new_adapter(c, gms[c.gm_path].get_parameter(c.param), config),
                adapter_name=adapter_name, lowering=config.lowering, recompute_inputs=config.recompute_inputs)
    record_trainable_(root, adapter_name, trainable)
    skipped = find_left_out(root, consumers, chosen, targets=config.targets, exclude=config.exclude,
                            trainable=trainable)
    record_left_out_(root, adapter_name, skipped)
    _warn_left_out(adapter_name, [e for e in skipped if not e.by_user])
    return record_config_(root, adapter_name, config)


def _warn_left_out(adapter_name: str, entries: Sequence) -> None:
    if not entries:
        return
    lines = [f"{e.param} {tuple(e.shape)}: {e.reason}" for e in entries[:20]]
    more = f"\n  ... and {len(entries) - 20} more" if len(entries) > 20 else ""
    warnings.warn(f"adapter {adapter_name!r} leaves out {len(entries)} weight(s) (floating point, at least 2-D); "
                  "lora_fx.left_out(model) lists them and lora_fx.summary(model) shows them:\n  - "
                  + "\n  - ".join(lines) + more, LoraFxWarning, stacklevel=4)


def named_adapters(gm: nn.Module) -> list[tuple[str, str, LoraAdapter]]:
    """``(adapter name, module path, LoraAdapter)`` for every adapter module of ``gm``, each once,
    in graph order (root first)."""
    return list(iter_adapters(gm))


def active_adapters(gm: nn.Module) -> list[str]:
    """Names of the adapters in the active set (as PEFT's ``active_adapters``), in the order they
    were added; the on/off switch (:func:`lora_fx.enable_adapters_`) does not change it."""
    on = {n for n, _, a in named_adapters(gm) if a.active}
    return [n for n in adapter_names(gm) if n in on]


def _as_names(names: Union[str, Sequence[str]]) -> list[str]:
    if isinstance(names, str):
        return [names]
    out = list(names)
    if not all(isinstance(n, str) for n in out):
        raise ConfigError(f"adapter names must be strings, got {out!r}")
    return out


def _apply(gm: nn.Module, mixes: Mapping[str, float]) -> None:
    """Make the adapters in ``mixes`` the active set, with those mixing weights; the others leave
    it (their mixing weights are kept).  The on/off switch (``enabled``) is not touched.  Only
    values change (``scaling`` buffers refilled in place): ``requires_grad`` is left alone,
    since flipping it makes ``torch.compile`` recompile; :func:`lora_fx.mark_only_lora_as_trainable`
    freezes inactive adapters when training."""
    for name, _, a in iter_adapters(gm):
        a.active = name in mixes
        if name in mixes:
            a.mix = float(mixes[name])
        a.refresh_scaling_()


def set_active_adapters(gm: nn.Module, names: Union[str, Sequence[str]]) -> nn.Module:
    """Make exactly ``names`` the active set (one name, several, or ``[]`` for none); returns ``gm``.

    Each active adapter contributes its full ``ΔW`` (its mixing weight is set to 1); the op sees
    ``W + Σ_active ΔW``.  The on/off switch of :func:`lora_fx.enable_adapters_` /
    :func:`lora_fx.disable_adapters` is separate state and is not touched: switched-off adapters
    stay off until switched on.  No re-tracing; compiled graphs keep running without recompiling (only
    the adapters' ``scaling`` buffers change value).  ``requires_grad`` is not touched: call
    :func:`lora_fx.mark_only_lora_as_trainable` after switching to train exactly the active
    adapters (inactive ones then get no gradient, as DDP with ``find_unused_parameters=False``
    needs).

    Raises:
        NotAdaptedError: ``gm`` carries no adapters.
        UnknownAdapterError: an unknown name (the message lists the known ones).
    """
    require_adapted(gm, "set_active_adapters")
    names = _as_names(names)
    check_adapter_names(gm, names)
    _apply(gm, {n: 1.0 for n in names})
    return gm


def _targets(gm: nn.Module, name: str) -> set[str]:
    return {prefix + rec.param for prefix, _, rec, _ in adapter_records(gm) if rec.adapter == name}


def set_adapter_weights(gm: nn.Module, weights: Mapping[str, float], *, same_targets: bool = True) -> nn.Module:
    """Weighted linear combination of adapters: every targeted op sees
    ``W + Σ_name weights[name] · ΔW_name`` (PEFT's ``add_weighted_adapter(combination_type="linear")``
    without building a new adapter; ranks may differ).  ``weights`` becomes the active set; adapters
    not in it leave the active set.  The on/off switch is not touched.

    Args:
        gm: an adapted module.
        weights: ``{adapter name: weight}``; weights are floats (0 keeps the adapter in the
            graph with no effect; negative subtracts it).
        same_targets: require every named adapter to adapt the same parameters (default), so
            the combination is the same at every site.

    Raises:
        UnknownAdapterError: unknown names.
        ConfigError: a non-numeric weight, or a DoRA adapter (DoRA is not linear in its update; its
            weight only gates it, see :func:`lora_fx.ops.dora_merge`).
        TargetError: ``same_targets`` and the adapters' targets differ (lists the differences).
    """
    require_adapted(gm, "set_adapter_weights")
    check_adapter_names(gm, list(weights))
    for n, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise ConfigError(f"weight of adapter {n!r} must be a number, got {w!r}")
    dora = sorted({n for n, _, a in iter_adapters(gm, weights) if a.use_dora})
    if dora:
        raise ConfigError(f"adapter(s) {dora} use DoRA, which is not linear in its update; combine plain "
                          "LoRA adapters, or activate a DoRA adapter alone with set_active_adapters().")
    if same_targets and len(weights) > 1:
        names = list(weights)
        first = _targets(gm, names[0])
        diffs = []
        for n in names[1:]:
            t = _targets(gm, n)
            if t != first:
                diffs.append(f"{n!r} vs {names[0]!r}: only in {n!r}: {sorted(t - first)}, "
                             f"only in {names[0]!r}: {sorted(first - t)}")
        if diffs:
            raise TargetError("set_adapter_weights() combines adapters of the same targets, but:\n  - "
                              + "\n  - ".join(diffs) + "\nPass same_targets=False to combine them anyway.")
    _apply(gm, {n: float(w) for n, w in weights.items()})
    return gm


def add_adapter(
    gm: nn.Module,
    name: str,
    rank: int = UNSET,
    *,
    config: Optional[LoraConfig] = None,
    activate: bool = False,
    **options,
) -> nn.Module:
    """Add adapter ``name`` to an adapted module in place (no re-tracing of the model: the pass
    runs again on the existing graph and appends the new merge / delta nodes after the existing
    ones, so an op sees ``W + ΔW_old + ΔW_name``).  Returns ``gm``.

    Args:
        gm: a module from :func:`lora_fx.transform`.
        name: new adapter name (a valid Python identifier, not already used).
        rank, config, options: as :func:`lora_fx.transform`'s ``rank``, ``config`` and config
            keywords (``alpha``, ``targets``, ``exclude``, ``rank_pattern``, ``alpha_pattern``,
            ``use_rslora``, ``use_dora``, ``init``, ``dropout``, ``lowering``, ``adapter_dtype``).
        activate: add the new adapter to the active set (mixing weight 1) alongside the active
            ones.  Default False, as HF PEFT's ``add_adapter``: the new adapter is added outside
            the active set with ``requires_grad=False``; call :func:`set_active_adapters` to use
            or train it.  Its on/off switch starts on.

    Raises:
        NotAdaptedError: ``gm`` is not an adapted module.
        ConfigError: ``name`` exists already or is not an identifier; bad options; ``init="pissa"``
            on a module whose weights are shared with the user's model.
        TargetError / UnsupportedSiteError: as in :func:`lora_fx.transform`.
    """
    require_adapted(gm, "add_adapter", root=True)
    check_adapter_name(name)
    if name in adapter_names(gm):
        raise ConfigError(f"adapter {name!r} already exists on this module; delete_adapter(gm, {name!r}) "
                          "first or pick another name")
    keys = {f for f in LoraConfig.__dataclass_fields__ if f != "version"}
    unknown = sorted(set(options) - keys)
    if unknown:
        raise ConfigError(unknown_keywords_message("add_adapter()", unknown, keys))
    cfg = config_with(config, rank=rank, **options)
    was_training = gm.training
    adapt_(gm, cfg, name)
    for _, _, a in iter_adapters(gm, [name]):
        a.active = bool(activate)
        a.refresh_scaling_()
        for p in a.parameters():
            p.requires_grad_(bool(activate))
    if activate:
        for n in trainable_params(gm, [name]):
            gm.get_parameter(n).requires_grad_(True)
    gm.train(was_training)
    return gm


def delete_adapter(gm: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name`` in place: its graph nodes (each merge / delta node is replaced by
    its first argument, the value it adapted), its modules and its records.  Other adapters are
    untouched.  Returns ``gm``.

    Raises:
        NotAdaptedError: ``gm`` carries no adapters.
        UnknownAdapterError: unknown ``name``.
    """
    require_adapted(gm, "delete_adapter")
    check_adapter_names(gm, [name])
    for path, sub in regions(gm):
        st = state_of(sub)
        if st is not None:  # the same removal pass as fold, for this adapter's modules only
            remove_lora_(sub, [p for p, r in st.adapters.items() if r.adapter == name],
                         module=gm.get_submodule(path) if path else gm)
    record_trainable_(gm, name, [])
    forget_config_(gm, name)
    return gm
