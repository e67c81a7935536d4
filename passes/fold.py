"""Fold pass: evaluate every active delta once and write plain weights into a *new* module.

``W_folded = round_to(W.dtype)(W.float() + Σ_adapters ΔW.float())`` (one rounding); merge and
factored delta nodes are removed, opaque-leaf ``functional_call`` s become plain module calls
again, adapter submodules are dropped.  The input module is never modified.
"""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from lora_fx import ops
from lora_fx.adapter import ADAPTER_ATTR, LoraAdapter
from lora_fx.state import STATE_ATTR, state_of

from .trace import graph_modules

__all__ = ["fold_graph_modules", "folded_weight"]


def folded_weight(weight: torch.Tensor, adapters: list[LoraAdapter]) -> torch.Tensor:
    """``W + Σ ΔW`` computed in at least float32 and rounded once to ``W``'s dtype.

    Args:
        weight: base weight ``W`` of shape ``adapter.weight_shape``.
        adapters: the adapters on ``W`` (their current ``scaling`` is used; disabled ones add 0).

    Raises:
        ValueError: if the result is not finite (a diverged adapter), naming nothing silently.
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    out = weight.detach().to(compute)
    for a in adapters:
        s = a.scaling.to(compute)
        out = out + (a.lora_B.detach().to(compute) @ (a.lora_A.detach().to(compute) * s)).reshape(weight.shape)
    if not torch.isfinite(out).all():
        raise ValueError("folded weight is not finite: an adapter holds inf/nan values")
    return out.to(weight.dtype)


def _strip_graph(gm: fx.GraphModule) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and (node.target is ops.merge or node.target in ops.DELTA_OPS):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is ops.module_call:
            with graph.inserting_before(node):
                call = graph.call_module(node.args[0].target, tuple(node.args[2:]), dict(node.kwargs))
            node.replace_all_uses_with(call)
            graph.erase_node(node)
    for node in reversed(list(graph.nodes)):
        adapter_node = (node.op == "get_attr" or (node.op == "call_module" and f"{ADAPTER_ATTR}." in node.target))
        if not node.users and adapter_node:
            graph.erase_node(node)


def _read_by_graph(gm: fx.GraphModule, name: str) -> bool:
    """Whether a node of ``gm``'s own graph reads parameter ``name`` (``get_attr`` or a leaf call)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target == name:
            return True
        if (node.op == "call_module" and name.startswith(f"{node.target}.")
                and not isinstance(gm.get_submodule(node.target), fx.GraphModule)):
            return True
    return False


def _in_child_graph_module(gm: fx.GraphModule, name: str) -> bool:
    parts = name.split(".")[:-1]
    return any(isinstance(gm.get_submodule(".".join(parts[:i])), fx.GraphModule) for i in range(1, len(parts) + 1))


def fold_graph_modules(root: nn.Module) -> tuple[nn.Module, dict]:
    """Fold a deep copy of ``root``; returns ``(folded, info)`` where ``info`` has ``"folded"``
    (names of folded parameters) and ``"untied"`` (names that shared storage with an unadapted
    alias and now hold their own folded tensor)."""
    new = copy.deepcopy(root)
    info = {"folded": [], "untied": []}
    # Collect everything before writing anything: an owner module can be reachable from several
    # GraphModules, and a parameter must be folded exactly once.
    plans = []
    for gm_path, gm in graph_modules(new):
        st = state_of(gm)
        if st is None:
            continue
        by_param: dict[int, tuple[torch.Tensor, list[str], list[LoraAdapter]]] = {}
        for path, rec in st.adapters.items():
            w = gm.get_parameter(rec.param)
            entry = by_param.setdefault(id(w), (w, [], []))
            entry[1].extend(a for a in rec.aliases if a not in entry[1])
            entry[2].append(gm.get_submodule(path))
        names: dict[int, list[str]] = {}
        for name, p in gm.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        plans.append((gm, f"{gm_path}." if gm_path else "", list(by_param.values()), names))
    memo: dict[tuple, nn.Parameter] = {}
    pending: list[tuple] = []
    for gm, prefix, entries, names in plans:
        for w, aliases, adapters in entries:
            key = (id(w),) + tuple(sorted(id(a) for a in adapters))
            if key not in memo:
                memo[key] = nn.Parameter(folded_weight(w, adapters), requires_grad=w.requires_grad)
            for alias in aliases:
                owner_path, _, pname = alias.rpartition(".")
                owner = gm.get_submodule(owner_path) if owner_path else gm
                owner._parameters[pname] = memo[key]
                info["folded"].append(prefix + alias)
            others = [n for n in names.get(id(w), []) if n not in aliases and f"{ADAPTER_ATTR}." not in n]
            read = [n for n in others if _read_by_graph(gm, n)]
            for n in others:  # names no node reads (fx reads a tied weight by its first name)
                if n not in read and not _in_child_graph_module(gm, n):
                    owner_path, _, pname = n.rpartition(".")
                    (gm.get_submodule(owner_path) if owner_path else gm)._parameters[pname] = memo[key]
            nested = [n for n in others if n not in read and _in_child_graph_module(gm, n)]
            if read:
                info["untied"].extend(prefix + a for a in aliases)
            elif nested:  # decided once every block's plan ran: still the old tensor there → untied
                pending.append((gm, prefix, aliases, nested, memo[key]))
    for gm, prefix, aliases, nested, folded in pending:
        if any(gm.get_parameter(n) is not folded for n in nested):
            info["untied"].extend(prefix + a for a in aliases)
    for gm, _, _, _ in plans:
        _strip_graph(gm)
        for m in list(gm.modules()):
            if isinstance(m._modules.get(ADAPTER_ATTR), nn.ModuleDict):
                del m._modules[ADAPTER_ATTR]
        delattr(gm, STATE_ATTR)
        gm.graph.lint()
        gm.recompile()
    return new, info
