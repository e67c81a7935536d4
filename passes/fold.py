"""Fold pass: evaluate every active delta once and write plain weights into a *new* module.

``W_folded = round_to(W.dtype)(W.float() + Σ_adapters ΔW.float())`` (one rounding, through
:func:`lora_fx.weights.fold_into`); then :func:`~lora_fx.passes.remove_lora.remove_lora_` removes
merge and factored delta nodes, turns opaque-leaf ``functional_call`` s back into plain module calls
and drops the adapter submodules and records.  The input module is never modified.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from lora_fx import ops, weights
from lora_fx.errors import NonFiniteError, UnsupportedSiteError
from lora_fx.regions import strip_regions_
from lora_fx.state import is_adapter_path, regions, state_of

from .remove_lora import remove_lora_


if TYPE_CHECKING:  # annotations only: passes never import the adapters package
    from lora_fx.adapters.module import LoraAdapter

__all__ = ["fold_graph_modules", "fold_regions", "folded_weight"]


def folded_weight(weight: torch.Tensor, adapters: list[LoraAdapter], *, name: str = "weight") -> torch.Tensor:
    """``W + Σ ΔW`` computed in at least float32 and rounded once (:func:`lora_fx.weights.fold_into`:
    a plain weight gets ``W``'s dtype; another weight kind decides what it returns).

    Args:
        weight: base weight ``W`` of logical shape ``adapter.weight_shape``.
        adapters: the adapters on ``W`` in the order the graph applies them (merge-lowered ones
            first, in chain order, then factored ones); their current ``scaling`` is used and
            disabled ones add 0.  DoRA adapters apply :func:`lora_fx.ops.dora_merge`.

        name: the weight's name, for the error.

    Raises:
        NonFiniteError: the result is not finite (a diverged adapter), naming the weight.
    """

    def update(out: torch.Tensor) -> torch.Tensor:  # out: dequantized W, float32 or wider
        compute = out.dtype
        with torch.no_grad():
            for a in adapters:
                if getattr(a, "use_dora", False):  # DoRA: the same function the graph calls, in fp32
                    out = ops.dora_merge(out, a.lora_A.detach().to(compute), a.lora_B.detach().to(compute),
                                         a.scaling.to(compute), a.lora_magnitude.detach().to(compute), a.base_scaling)
                    continue
                out = out + a.delta_weight(dtype=compute).detach()  # fused: exact zeros on disabled rows
        if not torch.isfinite(out).all():
            bad = [f"lora_A/lora_B of rank {a.rank}" for a in adapters
                   if not all(bool(torch.isfinite(p).all()) for p in a.parameters())]
            raise NonFiniteError(
                f"fold: the folded '{name}' is not finite ({'; '.join(bad) or 'W + ΔW overflows'} hold inf/NaN "
                "values): its adapter diverged in training. Reload a finite adapter (load_lora_state / "
                "load_adapter_values_), or retrain with a lower learning rate or gradient clipping; the adapted "
                "model is unchanged.")
        return out

    return weights.fold_into(weight, update)


def _read_by_graph(gm: fx.GraphModule, name: str) -> bool:
    """Whether a node of ``gm``'s own graph reads parameter ``name`` (``get_attr`` or a leaf call)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == name:
            return True
        if (node.op == "call_module" and name.startswith(f"{node.target}.")
                and not isinstance(gm.get_submodule(node.target), fx.GraphModule)):
            return True
    return False


def fold_graph_modules(root: nn.Module) -> tuple[nn.Module, dict]:
    """Fold a deep copy of ``root``; returns ``(folded, info)`` where ``info`` has ``"folded"``
    (names of folded parameters) and ``"untied"`` (folded names that shared one parameter with a
    name that now holds another tensor: an unadapted alias, or one seeing other adapters).  Aliases
    whose consumers see the same adapters share one new folded parameter (the tie is kept); no
    tensor is written in place, so shared storage is never modified."""
    new = copy.deepcopy(root)
    info, plans = _fold_weights_(new)
    for gm, _, _ in plans:  # the same removal pass as delete_adapter, for every adapter
        remove_lora_(gm)
    return new, info


def fold_regions(root: nn.Module) -> tuple[nn.Module, dict]:
    """:func:`fold_graph_modules` for a model that kept its class: the copy's weights are folded
    as there, then every adapter, region, instance ``forward`` and lora_fx attribute is removed
    (:func:`lora_fx.regions.strip_regions_`), so the result is the model's own classes running
    their own code, with folded weights."""
    new = copy.deepcopy(root)
    info, _ = _fold_weights_(new)
    for path, gm in regions(new):  # the graphs go away: modules and records only
        remove_lora_(gm, module=new.get_submodule(path) if path else new, rewrite=False)
    strip_regions_(new)
    return new, info


def _fold_weights_(new: nn.Module) -> tuple[dict, list]:
    """Write the folded weights into ``new`` (a copy the caller owns); returns ``(info, plans)``."""
    info: dict[str, list] = {"folded": [], "untied": []}
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
    for gm, prefix, by_alias in plans:
        for alias, (w, adapters) in by_alias.items():
            key = (id(w),) + tuple(sorted(id(a) for a in adapters))
            if key not in memo:
                memo[key] = nn.Parameter(folded_weight(w, adapters, name=alias), requires_grad=w.requires_grad)
            owner_path, _, pname = alias.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
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
    return info, plans
