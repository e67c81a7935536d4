"""Fold pass: evaluate every active delta once and write plain weights into a *new* module.

``W_folded = round_to(W.dtype)(W.float() + Σ_adapters ΔW.float())`` (one rounding, through
:func:`lora_fx.weights.fold_into`; a quantized ``W`` is dequantized first and folds into a float
weight, or, on request, is quantized again in its own scheme); then
:func:`~lora_fx.passes.remove_lora.remove_lora_` removes merge and factored delta nodes, turns
opaque-leaf ``functional_call`` s back into plain module calls and drops the adapter submodules and
records; linears routed through the frozen-base op are module calls again
(:func:`~lora_fx.passes.route_quantized.unroute_quantized_`) and modules whose rule asks for it are
replaced (a bitsandbytes linear holding a float weight becomes an ``nn.Linear``).  The input module
is never modified.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Optional

import torch
from torch import fx, nn

from lora_fx import ops, weights
from lora_fx.errors import NonFiniteError, UnsupportedSiteError
from lora_fx.regions import strip_regions_
from lora_fx.rules import module_rule
from lora_fx.state import REQUANT_ERROR, is_adapter_path, regions, state_of

from .match_act_mul import unfuse_act_mul_
from .remove_lora import remove_lora_
from .route import unroute_
from .route_quantized import unroute_quantized_


if TYPE_CHECKING:  # annotations only: passes never import the adapters package
    from lora_fx.adapters.module import LoraAdapter

__all__ = ["fold_graph_modules", "fold_regions", "folded_weight", "fold_update"]


def folded_weight(weight: torch.Tensor, adapters: list[LoraAdapter], dtype: Optional[torch.dtype] = None, *,
                  name: str = "weight") -> torch.Tensor:
    """``W + Σ ΔW`` computed in at least float32 and rounded once (:func:`lora_fx.weights.fold_into`)
    to ``dtype``, by default the weight's compute dtype (a quantized weight folds into a plain float
    tensor of its logical shape).

    Args:
        weight: base weight ``W`` of logical shape ``adapter.weight_shape``.
        adapters: the adapters on ``W`` in the order the graph applies them (merge-lowered ones
            first, in chain order, then factored ones); their current ``scaling`` is used and
            disabled ones add 0.  DoRA adapters apply :func:`lora_fx.ops.dora_merge`.
        dtype: the result's dtype (None: the weight's compute dtype).
        name: the weight's name, for the error.

    Raises:
        NonFiniteError: the result is not finite (a diverged adapter), naming the weight.
    """

    def update(out: torch.Tensor) -> torch.Tensor:  # out: dequantized W, float32 or wider
        out = fold_update(out, adapters)
        if not torch.isfinite(out).all():
            bad = [f"lora_A/lora_B of rank {a.rank}" for a in adapters
                   if not all(bool(torch.isfinite(p).all()) for p in a.parameters())]
            raise NonFiniteError(
                f"fold: the folded '{name}' is not finite ({'; '.join(bad) or 'W + ΔW overflows'} hold inf/NaN "
                "values): its adapter diverged in training. Reload a finite adapter (load_lora_state / "
                "load_adapter_values_), or retrain with a lower learning rate or gradient clipping; the adapted "
                "model is unchanged.")
        return out

    return weights.fold_into(weight, update, dtype)


def fold_update(out: torch.Tensor, adapters: list[LoraAdapter]) -> torch.Tensor:
    """``out + Σ ΔW`` in ``out``'s dtype (float32 or wider), the adapters in order, no autograd: the
    sum :func:`folded_weight` rounds once (the inference cache computes its merged weights with it,
    so they equal the folded model's bit for bit)."""
    compute = out.dtype
    with torch.no_grad():
        for a in adapters:
            if getattr(a, "use_dora", False):  # DoRA: the same function the graph calls, in fp32
                out = ops.dora_merge(out, a.lora_A.detach().to(compute), a.lora_B.detach().to(compute),
                                     a.scaling.to(compute), a.lora_magnitude.detach().to(compute), a.base_scaling)
                continue
            out = out + a.delta_weight(dtype=compute).detach()  # fused: exact zeros on disabled rows
    return out


def _requantized(weight: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``value`` back in ``weight``'s quantization scheme, and the error ``{"max", "mean"}`` of the
    requantized weight (dequantized) against ``value`` (:data:`lora_fx.state.REQUANT_ERROR`)."""
    q = weights.requantize(weight, value)
    err = (weights.dequantize(q).detach().double() - value.detach().double()).abs()
    return q, {"max": float(err.max()), "mean": float(err.mean())}


def _parameter(value: torch.Tensor, requires_grad: bool) -> nn.Parameter:
    # a quantized parameter type (bitsandbytes' Params4bit is an nn.Parameter subclass) is kept as it is
    return value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=requires_grad)


def _replace_folded_modules_(new: nn.Module, owners: dict[int, nn.Module]) -> None:
    """Give each module that owns a folded weight to its rule's ``after_fold`` hook and put what it
    returns (e.g. an ``nn.Linear`` for a bitsandbytes linear now holding a float weight) in its
    place, under every path it is reachable by."""
    replaced = {}
    for mid, mod in owners.items():
        hook = module_rule(mod).after_fold
        other = hook(mod) if hook is not None else None
        if other is not None:
            replaced[mid] = other
    if not replaced:
        return
    for _, parent in list(new.named_modules(remove_duplicate=False)):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replaced:
                parent._modules[child_name] = replaced[id(child)]


def _read_by_graph(gm: fx.GraphModule, name: str) -> bool:
    """Whether a node of ``gm``'s own graph reads parameter ``name`` (``get_attr`` or a leaf call)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == name:
            return True
        if (node.op == "call_module" and name.startswith(f"{node.target}.")
                and not isinstance(gm.get_submodule(node.target), fx.GraphModule)):
            return True
    return False


def fold_graph_modules(root: nn.Module, *, requantize: bool = False,
                       dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, dict]:
    """Fold a deep copy of ``root``; returns ``(folded, info)`` where ``info`` has ``"folded"``
    (names of folded parameters) and ``"untied"`` (folded names that shared one parameter with a
    name that now holds another tensor: an unadapted alias, or one seeing other adapters).  Aliases
    whose consumers see the same adapters share one new folded parameter (the tie is kept); no
    tensor is written in place, so shared storage is never modified.

    A quantized weight folds into a float weight of its compute dtype (or ``dtype``), and its
    module's rule may replace the module (``ModuleRule.after_fold``); with ``requantize`` it is
    quantized again in its own scheme and ``info[REQUANT_ERROR]`` records the error per name.
    Linears routed through the frozen-base op are module calls again."""
    new = unroute_(copy.deepcopy(root))  # routed sites: back to their chains (and no route buffers)
    info, plans, owners = _fold_weights_(new, requantize, dtype)
    for gm, _, _ in plans:  # the same removal pass as delete_adapter, for every adapter
        remove_lora_(gm)
    for _, gm in regions(new):
        unroute_quantized_(gm)
        if unfuse_act_mul_(gm.graph):  # graphs that held no adapter (remove_lora_ rewrote the others)
            gm.recompile()
    _replace_folded_modules_(new, owners)
    return new, info


def fold_regions(root: nn.Module, *, requantize: bool = False,
                 dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, dict]:
    """:func:`fold_graph_modules` for a model that kept its class: the copy's weights are folded
    as there, then every adapter, region, instance ``forward`` and lora_fx attribute is removed
    (:func:`lora_fx.regions.strip_regions_`), so the result is the model's own classes running
    their own code, with folded weights (a bitsandbytes linear holding a float weight becomes an
    ``nn.Linear``)."""
    new = unroute_(copy.deepcopy(root))  # routed sites: back to their chains (and no route buffers)
    info, _, owners = _fold_weights_(new, requantize, dtype)
    for path, gm in regions(new):  # the graphs go away: modules and records only
        remove_lora_(gm, module=new.get_submodule(path) if path else new, rewrite=False)
    strip_regions_(new)
    _replace_folded_modules_(new, owners)
    return new, info


def _model_float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    """The floating dtype holding most elements among ``model``'s plain base parameters (adapters
    aside; None if none): what a quantized weight without a recorded dtype folds to."""
    count: dict[torch.dtype, int] = {}
    for name, p in model.named_parameters():
        if not is_adapter_path(name) and weights.is_plain(p) and p.is_floating_point():
            count[p.dtype] = count.get(p.dtype, 0) + p.numel()
    return max(count, key=count.get) if count else None


def _fold_weights_(new: nn.Module, requantize: bool, dtype: Optional[torch.dtype]) -> tuple[dict, list, dict]:
    """Write the folded weights into ``new`` (a copy the caller owns); returns ``(info, plans,
    owners)``, ``owners`` the modules owning a folded quantized weight (by id)."""
    info: dict = {"folded": [], "untied": []}
    errors: dict[str, dict] = {}
    owners: dict[int, nn.Module] = {}
    # Collect everything before writing anything: an owner module can be reachable from several
    # GraphModules, and a parameter must be folded exactly once.  Every name of every parameter
    # object is taken before anything is replaced, so ties across blocks are seen too.
    names: dict[int, list[str]] = {}
    for name, p in new.named_parameters(remove_duplicate=False):
        if not is_adapter_path(name):
            names.setdefault(id(p), []).append(name)
    plans = []
    for gm_path, gm in regions(new):
        st = state_of(gm)
        if st is None:
            continue
        # alias -> the adapters its consumers see: aliases of one parameter targeted by different
        # adapters get different folded tensors.  The graph applies merge chains to W before any
        # factored delta is added to the output (matters for DoRA).
        by_alias: dict[str, tuple[torch.Tensor, list[LoraAdapter]]] = {}
        order = sorted(st.adapters.items(), key=lambda kv: all(low == "factored" for _, _, low in kv[1].consumers))
        for path, rec in order:
            w = gm.get_parameter(rec.param)
            for alias in rec.aliases:
                entry = by_alias.setdefault(alias, (w, []))
                a = gm.get_submodule(path)
                if all(a is not x for x in entry[1]):
                    entry[1].append(a)
        plans.append((gm, f"{gm_path}." if gm_path else "", by_alias))
    memo: dict[tuple, nn.Parameter] = {}
    assigned: dict[int, dict[str, tuple]] = {}  # id(w) -> {global name: memo key}
    model_dtype = _model_float_dtype(new)
    for gm, prefix, by_alias in plans:
        for alias, (w, adapters) in by_alias.items():
            key = (id(w),) + tuple(sorted(id(a) for a in adapters))
            quantized = not weights.is_plain(w)
            if key not in memo:
                out = dtype if quantized else None
                if quantized and out is None and not weights.kind_of(w).dtype_recorded(w):
                    out = model_dtype  # bitsandbytes 8-bit keeps no record: the model's own dtype
                value = folded_weight(w, adapters, out, name=prefix + alias)
                if requantize and quantized:
                    value, errors[prefix + alias] = _requantized(w, value)
                memo[key] = _parameter(value, w.requires_grad)
            owner_path, _, pname = alias.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if quantized:  # the module itself (a region's own weight: the module it runs as)
                full = (prefix + owner_path).rstrip(".")
                module = new.get_submodule(full) if full else new
                owners[id(module)] = module
            owner._parameters[pname] = memo[key]
            info["folded"].append(prefix + alias)
            assigned.setdefault(id(w), {})[prefix + alias] = key
    gms = dict(regions(new))

    def read_by_any_graph(name: str) -> bool:
        return any(name.startswith(f"{p}." if p else "") and _read_by_graph(g, name[len(p) + 1 if p else 0:])
                   for p, g in gms.items())

    for wid, done in assigned.items():
        keys = set(done.values())
        if len(keys) == 1:  # names of the parameter no graph reads (fx reads a tied weight by its
            folded = memo[next(iter(keys))]  # first name) follow the folded tensor: no stale key
            for n in names.get(wid, []):
                if n not in done and not read_by_any_graph(n):
                    owner_path, _, pname = n.rpartition(".")
                    (new.get_submodule(owner_path) if owner_path else new)._parameters[pname] = folded
        folded_ids = {id(memo[k]) for k in set(done.values())}
        leaked = [n for n in names.get(wid, []) if n not in done and read_by_any_graph(n)
                  and id(new.get_parameter(n)) in folded_ids]
        if leaked:  # an unadapted consumer reads the same *module* as an adapted one: cannot untie
            raise UnsupportedSiteError(
                f"fold cannot give {leaked} (not targeted) the base weight back: it is the same module object as "
                f"the adapted {sorted(done)} (one module shared by several blocks), so folding one folds both. "
                "Target every alias of that weight (one shared adapter) or none; gm itself is exact and unchanged.")
        held = {id(new.get_parameter(n)) for n in names.get(wid, [])}
        if len(held) > 1:  # the parameter's names no longer all hold one tensor: untied
            info["untied"].extend(n for n in done if n not in info["untied"])
    if requantize:
        info[REQUANT_ERROR] = errors
    return info, plans, owners
