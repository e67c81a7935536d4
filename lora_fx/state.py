"""Every attribute and meta key lora_fx writes, the records it keeps, and the views built on them.

Nothing else in the library spells one of these keys: writers and readers import them from here.

==========================  =================================  =======================================
key                         where, holding                     written by / read by
==========================  =================================  =======================================
:data:`STATE_ATTR`          every adapted ``GraphModule``:     ``passes.insert_lora`` (records),
                            its :class:`GraphState`            ``passes.remove_lora`` (drops them and,
                                                               with the last, the attribute); read
                                                               through :func:`state_of` by every
                                                               function taking an adapted model
:data:`CONFIG_ATTR`         root: ``{adapter: LoraConfig}``    :func:`record_config_` /
                                                               :func:`forget_config_` (add / delete),
                                                               ``deploy.fold`` (deletes it); read by
                                                               :func:`adapter_names`, ``io.peft``
:data:`OWNS_WEIGHTS_ATTR`   root: base weights are its own     ``api.transform``; read by
                            copies (``copy_weights=True``)     ``adapters.init.check_pissa``
:data:`ADAPTER_ATTR`        owner module of a base parameter:  ``passes.insert_lora``,
                            ``ModuleDict[adapter][param]``     ``passes.remove_lora``; paths from
                            of ``LoraAdapter`` s               :func:`adapter_path`
:data:`FRONTEND_META`       root ``.meta``: ``"fx"`` or        ``passes.capture``,
                            ``"export"``                       ``passes.trace_export``; read through
                                                               :func:`frontend_of`
:data:`FRONTEND_ATTR`       a root that kept its class: the    ``passes.capture``; read through
                            front-end (``"regions"``)          :func:`frontend_of`
:data:`REGION_ATTR`         ``__dict__`` of a module that      ``passes.trace_regions``; read
                            kept its class: its region         through :func:`regions`; removed by
                            ``GraphModule``                    ``lora_fx.regions.strip_regions_``
:data:`KEPT_ATTR`           ``__dict__`` of a module kept as   ``passes.trace_regions``; read by
                            its own Python: why                :func:`capture_of`
:data:`CAPTURE_META`        region ``.meta``: the children     ``passes.trace_regions``; read by
                            kept as leaves of its graph        :func:`capture_of`
:data:`FOLD_META`           folded root ``.meta``:             ``deploy.fold``; read by users
                            ``{"folded": [...], "untied": []}``
                            (+ :data:`REQUANT_ERROR` with
                            ``fold(requantize=True)``)
:data:`FOLD_ATTR`           folded root that kept its class:   ``deploy.fold``; read by users
                            the same record
:data:`LEAF_ATTR`           class attribute: keep instances    ``lora_fx.nn.layers``; read by
                            as opaque leaves when tracing      ``passes.trace_fx``
:data:`PISSA_BUFFERS`       adapter: PiSSA's initial factors   ``adapters.init.pissa_init_``; read by
                            (non-persistent buffers)           ``io.peft.save_adapter``
:data:`FILE_META`           safetensors metadata of adapter    ``io._files``, ``io.native``,
                            files                              ``io.peft``
:data:`TRAINABLE_ATTR`      root: ``{adapter: [parameter]}``:  ``api.transform``, ``add_adapter``;
                            base parameters trained in full    read by :func:`trainable_params`
                            (``LoraConfig.trainable``)
:data:`BUFFERS_ATTR`        root: ``{buffer key: fingerprint}``  ``api.transform``; read by
                            of the model's persistent buffers  :func:`changed_buffers` (``io``)
                            at transform time
:data:`ROUTE_ATTR`          root: its :class:`RouteState`      ``passes.route`` (``route_``,
                            (routed sites, adapter order)      ``unroute_``); read by ``routing``
:data:`ROUTE_BUFFER`        every GraphModule with routed      ``passes.route``; refilled by
                            sites: the shared ``route (b,)``   ``routing.route_adapters``
                            buffer (non-persistent)
:data:`POLICY_ATTR`         root: the default-target policy    ``api.transform`` (from the user's
                            read from the user's model         model, ``targets.target_policy``);
                                                               read by ``adapters.lifecycle.adapt_``
:data:`LEFT_OUT_ATTR`       root: ``{adapter: (LeftOut,)}``    :func:`record_left_out_` (from
                            weights an adapter leaves out      ``adapt_``), :func:`forget_config_`;
                                                               read by :func:`left_out`, ``report``
==========================  =================================  =======================================

:data:`WRAPPER_PARTS` are the module names PyTorch's wrappers insert (``torch.compile``,
FSDP1, activation checkpointing); :func:`unwrap` and :func:`plain_name` remove them, so keys and
names are the same whether the model is wrapped or not.

The adapter module's own attributes (``lora_A``, ``lora_B``, ``scaling``, ``lora_magnitude``,
``dropout``, ``rank``, ``alpha``, ``mix``, ``enabled``, ``blocks``) are defined by
:class:`~lora_fx.adapters.module.LoraAdapter`.  Records are plain data, so they survive
``deepcopy``, ``pickle`` and ``torch.save``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

from torch import fx, nn

from .errors import NotAdaptedError, UnknownAdapterError
# the adapter attribute, wrapper names and the name / key helpers (re-exported: one import for keys)
from .names import (ADAPTER_ATTR, BIAS_MODES, WRAPPER_PARTS, adapter_modules, adapter_owners, adapter_path,
                    check_bias, is_adapter_path, is_bias_key, is_lora_key, is_lora_layer, plain_name, unwrap)

if TYPE_CHECKING:  # annotations only: the adapter module imports this one
    from .adapters.module import LoraAdapter

__all__ = [
    "STATE_ATTR", "CONFIG_ATTR", "OWNS_WEIGHTS_ATTR", "ADAPTER_ATTR", "FRONTEND_META", "FRONTEND_ATTR",
    "REGION_ATTR", "KEPT_ATTR", "CAPTURE_META", "FOLD_META", "FOLD_ATTR", "REQUANT_ERROR", "LEAF_ATTR",
    "PISSA_BUFFERS", "FILE_META", "TRAINABLE_ATTR", "BUFFERS_ATTR", "WRAPPER_PARTS", "unwrap", "plain_name",
    "adapter_modules", "trainable_params", "record_trainable_", "POLICY_ATTR", "LEFT_OUT_ATTR", "QUANT_FLAG_ATTR",
    "regions", "graph_modules", "region_of", "capture_of", "frontend_of", "record_frontend_", "is_root",
    "ROUTE_ATTR", "ROUTE_BUFFER", "RouteState", "STACKS_META",
    "AdapterRecord", "GraphState", "LeftOut", "left_out", "record_left_out_", "policy_of", "state_of", "is_adapted",
    "require_adapted", "adapter_records", "iter_adapters",
    "adapter_names", "check_adapter_names", "configs_of", "record_config_", "forget_config_",
    "adapter_path", "is_adapter_path", "is_lora_key", "is_bias_key", "check_bias", "BIAS_MODES",
    "adapter_owners", "is_lora_layer",
]

#: Attribute of every adapted ``GraphModule`` (root and blocks) holding its :class:`GraphState`.
STATE_ATTR = "_lora_fx"
#: Attribute of the root ``GraphModule`` holding ``{adapter name: LoraConfig}`` in the order added.
CONFIG_ATTR = "_lora_fx_configs"
#: Attribute of the root ``GraphModule``: True when its base weights are its own copies (PiSSA may
#: write residuals into them), False when they share storage with the user's model.
OWNS_WEIGHTS_ATTR = "_lora_fx_owns_weights"
#: Key of ``root.meta``: the front-end that captured the model (``"fx"`` or ``"export"``).
FRONTEND_META = "lora_fx_frontend"
#: Attribute of a root that kept its class (not a ``GraphModule``): the front-end, ``"regions"``.
FRONTEND_ATTR = "_lora_fx_frontend"
#: Key in a module's ``__dict__`` (outside ``_modules``): the region ``GraphModule`` whose code runs
#: as the module's ``forward`` (:class:`lora_fx.regions.RegionForward`).
REGION_ATTR = "_lora_fx_region"
#: Key in the ``__dict__`` of the root and of every region while the opt-in inference cache is on:
#: the model's :class:`lora_fx.inference.InferenceCache` (merged weights for ``no_grad`` calls).
INFERENCE_ATTR = "_lora_fx_inference_cache"
#: Key in the ``__dict__`` of a module the regions front-end kept as its own Python: why (one line).
KEPT_ATTR = "_lora_fx_kept"
#: Key of a region's ``.meta``: the paths (relative to the region) of children kept as leaves.
CAPTURE_META = "lora_fx_leaves"
#: Key of a weights region's ``.meta`` (a kept module reading its own stacks of expert weights):
#: ``{parameter name: ExpertStack}``.
STACKS_META = "lora_fx_stacks"
#: Key of ``folded.meta``: ``{"folded": [names], "untied": [names]}`` (see :func:`lora_fx.fold`).
FOLD_META = "lora_fx"
#: Attribute of a folded model that kept its class (no ``.meta``): the same record as
#: ``folded.meta[FOLD_META]`` of a folded ``GraphModule``.
FOLD_ATTR = "lora_fx_fold"
#: Key of ``folded.meta[FOLD_META]`` after ``fold(..., requantize=True)``: ``{name: {"max": float,
#: "mean": float}}``, the absolute difference between each requantized weight (dequantized) and the
#: float fold it was quantized from, largest and mean over the weight's elements.
REQUANT_ERROR = "requantization_error"
#: Class attribute: instances are kept as opaque leaves by the torch.fx front-end.
LEAF_ATTR = "_lora_fx_leaf"
#: Non-persistent buffers of a PiSSA adapter: its initial factors ``(A0, B0)``.
PISSA_BUFFERS = ("init_A", "init_B")
#: safetensors metadata keys: the file format tag, the adapter name and its config (JSON), the
#: state of every adapter and what else the file carries (JSON, :mod:`lora_fx.io.native`) and the
#: per-tensor checksums (JSON ``{key: sha256 hex}``, :mod:`lora_fx.io._files`).
FILE_META = {"format": "lora_fx", "adapter": "lora_fx_adapter", "config": "lora_fx_config",
             "state": "lora_fx_state", "checksums": "lora_fx_sha256"}
#: Attribute of the root: its :class:`RouteState` once its sites are routed (per-sample adapters).
ROUTE_ATTR = "_lora_fx_route"
#: Non-persistent buffer of every GraphModule holding routed sites, one tensor shared by all: each
#: sample's adapter index ``(b,)`` (empty outside ``route_adapters``).
ROUTE_BUFFER = "_lora_fx_route_ids"
#: Attribute of the root: ``{adapter name: [fully qualified base parameter names]}`` trained in full
#: with that adapter (``LoraConfig.trainable``; PEFT's ``modules_to_save``).
TRAINABLE_ATTR = "_lora_fx_trainable"
#: Attribute of the root: ``{state-dict key: fingerprint}`` of the model's persistent buffers when
#: it was transformed, to tell which buffers training changed (BatchNorm statistics, EMAs).
BUFFERS_ATTR = "_lora_fx_buffers"
#: Attribute of the root: the :class:`lora_fx.targets.TargetPolicy` read from the user's model at
#: capture (what the graph does not show: a transformers model's embeddings, parametrized weights).
POLICY_ATTR = "_lora_fx_target_policy"
#: Attribute of the root: ``{adapter name: (LeftOut, ...)}``, the weights each adapter leaves out.
LEFT_OUT_ATTR = "_lora_fx_left_out"
#: On lora_fx's copy of a quantized transformers model: its ``is_quantized`` flag was cleared
#: (:func:`lora_fx.hf_quantization.mark_adapted_`), to be set again on a fold that stays quantized.
QUANT_FLAG_ATTR = "_lora_fx_was_quantized"


# ---------------------------------------------------------------------------------------------
# records


@dataclass
class AdapterRecord:
    """One adapter on one base parameter inside one GraphModule.

    Attributes:
        param: base parameter name relative to the GraphModule (the first targeted alias).
        adapter: adapter name (``"default"`` unless named).
        aliases: every targeted name of the same parameter object in this GraphModule.
        consumers: ``(node name, op kind, lowering)`` of each rewritten call.
    """

    param: str
    adapter: str
    aliases: list[str] = field(default_factory=list)
    consumers: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class RouteState:
    """Routing record of a root whose factored sites are routed nodes.

    Attributes:
        names: the adapter order the route indices refer to (the model's adapters when routed).
        holders: paths of the GraphModules holding routed nodes (and the route buffers).
        unroutable: ``{adapter name: [reason per site]}``: sites that cannot be routed (merge
            lowering, DoRA, expert stacks, delta ops without a routed form).
        adapters: ``(adapter name, LoraAdapter)`` of every adapter module, each once, in graph
            order (what a routing switches to its base scaling).
        active: inside :func:`lora_fx.route_adapters`.
    """

    names: tuple[str, ...]
    holders: list[str] = field(default_factory=list)
    unroutable: dict[str, list[str]] = field(default_factory=dict)
    adapters: list = field(default_factory=list)
    active: bool = False


@dataclass
class GraphState:
    """Per-GraphModule state: adapter module path → :class:`AdapterRecord`."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    version: int = 1


@dataclass(frozen=True)
class LeftOut:
    """A weight-like parameter (floating point, at least 2-D) that an adapter does not adapt.

    Attributes:
        param: its first name in the model; ``aliases``: every name of the parameter object.
        shape: its logical shape.
        op: the op kind(s) consuming it (``"unused"`` when no op reads it).
        reason: why it is left out, with what to do to adapt it where that is possible.
        by_user: left out by the user's own ``targets`` / ``exclude`` (not reported by the
            transform's warning).
    """

    param: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    op: str
    reason: str
    by_user: bool = False


def record_left_out_(root: nn.Module, name: str, entries: Sequence[LeftOut]) -> nn.Module:
    """Record the weights adapter ``name`` leaves out on ``root``; returns ``root``."""
    table = dict(getattr(root, LEFT_OUT_ATTR, {}))
    table[name] = tuple(entries)
    setattr(root, LEFT_OUT_ATTR, table)
    return root


def left_out(gm: nn.Module, adapter: Optional[str] = "default") -> list[LeftOut]:
    """The weight-like parameters (floating point, at least 2-D) that adapter ``adapter`` does not
    adapt, each with the reason (``None``: those of every adapter, each parameter once, for the
    parameters no adapter adapts).  :func:`lora_fx.summary` prints them.

    Raises:
        NotAdaptedError: ``gm`` carries no adapters.
        UnknownAdapterError: no adapter named ``adapter``.
    """
    require_adapted(gm, "left_out")
    table = getattr(gm, LEFT_OUT_ATTR, {})
    if adapter is not None:
        check_adapter_names(gm, [adapter])
        return list(table.get(adapter, ()))
    per = [{e.param: e for e in entries} for entries in table.values()]
    common = set.intersection(*(set(p) for p in per)) if per else set()
    return [e for e in (per[0].values() if per else ()) if e.param in common]


def policy_of(root: nn.Module):
    """The :class:`lora_fx.targets.TargetPolicy` recorded on ``root`` at capture, or None."""
    return getattr(root, POLICY_ATTR, None)


# ---------------------------------------------------------------------------------------------
# the regions seam: every captured graph of a model, whichever front-end made it


def region_of(module: nn.Module) -> Optional[fx.GraphModule]:
    """The region ``GraphModule`` of a module that kept its class (its code is the module's
    ``forward``), else None."""
    return module.__dict__.get(REGION_ATTR)


def regions(root: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """Every captured graph under ``root``, each once, with the path of the module it runs as, in
    ``named_modules`` order (root first): the ``GraphModule`` s of a traced hierarchy, and the
    region ``GraphModule`` of every module that kept its class.

    A region's parameter, buffer and submodule tables are the module's own (the same dicts), so
    ``gm.get_parameter`` / ``gm.get_submodule`` on it read the live model; its graph names them
    relative to the module.  Every reader of the graphs (sites, adapters, fold, report,
    distributed) goes through this one function."""
    out = []
    for name, m in root.named_modules():
        if isinstance(m, fx.GraphModule):
            out.append((name, m))
        else:
            gm = m.__dict__.get(REGION_ATTR)
            if gm is not None:
                out.append((name, gm))
    return out


#: The older name of :func:`regions`.
graph_modules = regions


def capture_of(module: nn.Module) -> Optional[str]:
    """How the regions front-end captured ``module``: ``"fx"``, ``"fx (leaves: a, b)"`` (children
    kept as opaque calls of its graph, each captured on its own), ``"kept: <reason>"`` (run as its
    own Python, its children visited; ``"kept: <reason> (expert stacks: a, b)"`` when its own
    stacks of expert weights are read through a weights region); None for a module it did not visit (inside a region, or
    without weights) and for the ``GraphModule`` s of the other front-ends."""
    gm = module.__dict__.get(REGION_ATTR)
    if gm is not None and STACKS_META in gm.meta:  # kept, its own expert stacks read through a weights region
        return f"kept: {module.__dict__.get(KEPT_ATTR)} (expert stacks: {', '.join(gm.meta[STACKS_META])})"
    if gm is not None:
        leaves = gm.meta.get(CAPTURE_META) or ()
        return f"fx (leaves: {', '.join(leaves)})" if leaves else "fx"
    reason = module.__dict__.get(KEPT_ATTR)
    return None if reason is None else f"kept: {reason}"


def frontend_of(root: nn.Module) -> Optional[str]:
    """The front-end that captured ``root``: ``"fx"``, ``"export"`` (a ``GraphModule`` root) or
    ``"regions"`` (a root that kept its class); None for a module :func:`lora_fx.transform` did not
    return."""
    if isinstance(root, fx.GraphModule):
        return root.meta.get(FRONTEND_META)
    return root.__dict__.get(FRONTEND_ATTR)


def record_frontend_(root: nn.Module, name: str) -> nn.Module:
    """Record the front-end on ``root`` (``meta`` of a ``GraphModule``, else an attribute); returns ``root``."""
    if isinstance(root, fx.GraphModule):
        root.meta[FRONTEND_META] = name
    else:
        root.__dict__[FRONTEND_ATTR] = name
    return root


def is_root(module: nn.Module) -> bool:
    """Whether ``module`` can be the model :func:`lora_fx.transform` returned: a ``GraphModule``, or
    a module that kept its class and carries the front-end record."""
    return isinstance(module, fx.GraphModule) or FRONTEND_ATTR in module.__dict__


def state_of(module: nn.Module) -> GraphState | None:
    """The :class:`GraphState` of a lora_fx ``GraphModule``, or of the region of a module that kept
    its class; else None."""
    if not isinstance(module, fx.GraphModule):
        module = module.__dict__.get(REGION_ATTR)
        if module is None:
            return None
    st = getattr(module, STATE_ATTR, None)
    return st if isinstance(st, GraphState) else None


def is_adapted(module: nn.Module) -> bool:
    """True when ``module`` or any submodule carries lora_fx adapters."""
    return any(state_of(gm) is not None and state_of(gm).adapters for _, gm in regions(module))


def require_adapted(module: nn.Module, what: str, *, detail: str = "", root: bool = False) -> None:
    """The guard of every function that needs an adapted module.

    Args:
        module: the argument to check.
        what: the public function's name, for the message.
        detail: extra explanation appended to the message.
        root: also require the root ``GraphModule`` that :func:`lora_fx.transform` returned.

    Raises:
        NotAdaptedError: ``module`` carries no lora_fx adapters (or, with ``root``, is not a
            ``GraphModule``).
    """
    if not is_adapted(module):
        raise NotAdaptedError(f"{what}() needs a module produced by lora_fx.transform; {type(module).__name__} "
                              f"carries no lora_fx adapters{detail}.")
    if root and not is_root(module):
        raise NotAdaptedError(f"{what}() needs the root module returned by lora_fx.transform, got "
                              f"{type(module).__name__}")


def adapter_records(root: nn.Module) -> Iterator[tuple[str, str, AdapterRecord, "LoraAdapter"]]:
    """Yield ``(prefix, adapter module path in root, record, adapter module)`` for every record of
    every graph under ``root`` (:func:`regions`: root first, graph order).  One adapter reached from
    several GraphModules (a weight shared by two blocks) is yielded once per GraphModule."""
    for gm_path, sub in regions(root):
        st = state_of(sub)
        if st is None:
            continue
        prefix = f"{gm_path}." if gm_path else ""
        for path, rec in st.adapters.items():
            yield prefix, prefix + path, rec, sub.get_submodule(path)


def iter_adapters(root: nn.Module, names: Optional[Iterable[str]] = None) -> Iterator[tuple[str, str, "LoraAdapter"]]:
    """``(adapter name, module path, LoraAdapter)`` of every adapter module under ``root``, each
    once (a shared adapter of tied weights too), in graph order, root first; only those named in
    ``names`` when given."""
    wanted = None if names is None else set(names)
    seen: set[int] = set()
    for _, path, rec, a in adapter_records(root):
        if id(a) not in seen and (wanted is None or rec.adapter in wanted):
            seen.add(id(a))
            yield rec.adapter, path, a


def configs_of(root: nn.Module) -> dict[str, Any]:
    """``{adapter name: LoraConfig}`` recorded on ``root`` (a copy; empty when none)."""
    return dict(getattr(root, CONFIG_ATTR, {}))


def record_config_(root: nn.Module, name: str, config: Any) -> nn.Module:
    """Record the config of adapter ``name`` on ``root``; returns ``root``."""
    configs = configs_of(root)
    configs[name] = config
    setattr(root, CONFIG_ATTR, configs)
    return root


def forget_config_(root: nn.Module, name: str) -> nn.Module:
    """Drop the recorded config (and left-out list) of adapter ``name`` (if any); returns ``root``."""
    configs = configs_of(root)
    configs.pop(name, None)
    setattr(root, CONFIG_ATTR, configs)
    if hasattr(root, LEFT_OUT_ATTR):
        table = dict(getattr(root, LEFT_OUT_ATTR))
        table.pop(name, None)
        setattr(root, LEFT_OUT_ATTR, table)
    return root


def adapter_names(root: nn.Module) -> list[str]:
    """Names of the adapters on ``root``, in the order they were added."""
    names = list(configs_of(root))
    names += [n for n, _, _ in iter_adapters(root) if n not in names]
    return names


def check_adapter_names(root: nn.Module, names: Sequence[str]) -> None:
    """Raise unless every name in ``names`` names an adapter of ``root``.

    Raises:
        UnknownAdapterError: listing the unknown names and the adapters present.
    """
    known = adapter_names(root)
    missing = [n for n in names if n not in known]
    if missing:
        shown = missing[0] if len(missing) == 1 else missing
        raise UnknownAdapterError(
            f"no adapter {shown!r} in {type(root).__name__} (unknown adapter name{'s' if len(missing) > 1 else ''}); "
            f"adapters present: {known}. Pass one of these, or add it with lora_fx.add_adapter(model, name, ...).")


# ---------------------------------------------------------------------------------------------
# what else an adapter carries: fully trained base parameters


def trainable_params(root: nn.Module, adapters: Optional[Iterable[str]] = None) -> list[str]:
    """Fully qualified names of the base parameters trained in full with the adapters ``adapters``
    (all when None), each once, in the order recorded (:data:`TRAINABLE_ATTR`)."""
    recorded = getattr(unwrap(root), TRAINABLE_ATTR, {}) or {}
    wanted = None if adapters is None else set(adapters)
    out: list[str] = []
    for name, params in recorded.items():
        if wanted is None or name in wanted:
            out += [p for p in params if p not in out]
    return out


def record_trainable_(root: nn.Module, name: str, params: Sequence[str]) -> nn.Module:
    """Record (``params`` non-empty) or forget (empty) the fully trained base parameters of adapter
    ``name`` on ``root``; returns ``root``."""
    recorded = dict(getattr(root, TRAINABLE_ATTR, {}) or {})
    recorded.pop(name, None)
    if params:
        recorded[name] = list(params)
    setattr(root, TRAINABLE_ATTR, recorded)
    return root
