"""Routing pass: turn each factored site's chain of delta nodes into one routed node, and back.

:func:`route_` replaces every chain ``y → δ_1 → … → δ_n`` (one delta op per adapter on one
consuming call: :data:`lora_fx.ops_route.ROUTED_KINDS`) by one
:func:`lora_fx.ops_route.routed_delta` node holding all ``n`` adapters and reading the shared route
buffer (:data:`lora_fx.state.ROUTE_BUFFER`).  Outside routing the node computes what the chain did,
so routing a graph changes no value; the graph keeps the routed nodes, so later routings (of any
names, same batch size) are buffer refills and never recompile.  :func:`unroute_` restores the
chains exactly (before ``add_adapter`` / ``delete_adapter`` edit them, and before fold).

Sites a routed node cannot stand for are recorded per adapter in the root's
:class:`~lora_fx.state.RouteState` (``unroutable``): merge-lowered sites (a per-sample merged
weight would be ``b`` weight copies), DoRA adapters, expert stacks (their rows are permuted by the
experts' own code), and delta ops without a routed form.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from lora_fx.ops import DELTA_OPS
from lora_fx.ops_route import ROUTED_KINDS, choose_algo, routed_delta
from lora_fx.state import (ADAPTER_ATTR, ROUTE_ATTR, ROUTE_BUFFER, RouteState, adapter_names, adapter_records,
                           iter_adapters, regions, state_of)

__all__ = ["route_", "unroute_", "is_routed"]

_KIND_OF = {fn: kind for kind, fn in ROUTED_KINDS.items()}
_EXTRA = {"linear": (), "matmul": (False,), "embedding": (None, False), "conv": None}


def is_routed(root: nn.Module) -> bool:
    """Whether ``root``'s sites are routed nodes (:func:`route_` ran and nothing undid it)."""
    return isinstance(getattr(root, ROUTE_ATTR, None), RouteState)


def _adapter_path(node) -> str | None:
    """``<owner>.lora.<adapter>.<param>`` of a ``get_attr`` node of ``….lora_A``."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and node.target.endswith(".lora_A"):
        return node.target[: -len(".lora_A")]
    return None


def _split(node: fx.Node, kind: str):
    """``(x, dropout path or None, extra, blocks)`` of one delta node."""
    x, drop = node.args[1], None
    if isinstance(x, fx.Node) and x.op == "call_module" and isinstance(x.target, str) \
            and x.target.endswith(".dropout") and f".{ADAPTER_ATTR}." in f".{x.target}":
        x, drop = x.args[0], x.target
    rest = tuple(node.args[5:])
    if kind == "linear":
        return x, drop, (), (rest[0] if rest else None)
    if kind == "conv":
        return x, drop, rest, None
    default = _EXTRA[kind]
    return x, drop, rest + default[len(rest):], None


def _chains(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Each maximal chain of delta nodes of one kind, each taking the previous as first argument."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _KIND_OF:
            continue
        prev = n.args[0]
        if isinstance(prev, fx.Node) and prev.op == "call_function" and prev.target in DELTA_OPS:
            continue  # not the head of its chain
        chain = [n]
        while True:
            nxt = [u for u in chain[-1].users if u.op == "call_function" and u.target is chain[-1].target
                   and u.args[0] is chain[-1]]
            if len(nxt) != 1 or len(chain[-1].users) != 1:
                break
            chain.append(nxt[0])
        out.append(chain)
    return out


def _unroutable(root: nn.Module) -> dict[str, list[str]]:
    """``{adapter name: [why one of its sites cannot be routed, ...]}`` for the adapters of ``root``."""
    out: dict[str, list[str]] = {}
    for prefix, _, rec, a in adapter_records(root):
        why = [f"'{prefix}{rec.param}' ({op}): {how}-lowered" for _, op, how in rec.consumers if how != "factored"]
        if getattr(a, "use_dora", False):
            why.append(f"'{prefix}{rec.param}': a DoRA adapter")
        if getattr(a, "experts", None) is not None:
            why.append(f"'{prefix}{rec.param}': a stack of expert weights (the experts' own code permutes rows)")
        if why:
            out.setdefault(rec.adapter, []).extend(why)
    return out


def route_(root: nn.Module) -> RouteState:
    """Route every factored site of ``root``'s GraphModules in place (see the module docstring);
    returns the root's :class:`RouteState` (also stored on it).  A routed root is unrouted first."""
    unroute_(root)
    names = tuple(adapter_names(root))
    gid = {n: i for i, n in enumerate(names)}
    device = next((p.device for _, p in root.named_parameters() if f".{ADAPTER_ATTR}." in f".{_}"), torch.device("cpu"))
    route = torch.empty(0, dtype=torch.long, device=device)
    state = RouteState(names=names, unroutable=_unroutable(root))
    for gm_path, gm in regions(root):
        st = state_of(gm)
        if st is None:
            continue
        prefix = f"{gm_path}." if gm_path else ""
        changed = False
        chains = _chains(gm)
        if chains:
            gm.register_buffer(ROUTE_BUFFER, route, persistent=False)
        for chain in chains:
            kind = _KIND_OF[chain[0].target]
            parts = [_split(n, kind) for n in chain]
            paths = [_adapter_path(n.args[2]) for n in chain]
            if len({p[0] for p in parts}) != 1 or any(p not in st.adapters for p in paths):
                continue  # not a chain lora_fx built
            x = parts[0][0]
            graph, last = gm.graph, chain[-1]
            remat = next((n.kwargs["remat"] for n in chain if n.kwargs.get("remat") is not None), None)
            ranks = [gm.get_submodule(p).lora_A.shape[0] for p in paths]
            rec = st.adapters[paths[0]]
            with graph.inserting_before(last.next):
                buf = graph.get_attr(ROUTE_BUFFER)
                adapters = tuple(
                    (n.args[2], n.args[3], n.args[4], graph.get_attr(drop) if drop else None,
                     gid[st.adapters[p].adapter], blocks)
                    for n, p, (_, drop, _, blocks) in zip(chain, paths, parts))
                node = graph.call_function(routed_delta, (
                    chain[0].args[0], x, kind, adapters, buf, len(names), parts[0][2], choose_algo(kind, ranks),
                    f"{prefix}{rec.param}"), {"remat": remat} if remat is not None else {})
            last.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
            for n in reversed(chain):
                dropped = n.args[1]
                graph.erase_node(n)
                if isinstance(dropped, fx.Node) and dropped.op == "call_module" and not dropped.users:
                    graph.erase_node(dropped)
            changed = True
        if changed:
            state.holders.append(gm_path)
            gm.graph.lint()
            gm.recompile()
    state.adapters = [(n, a) for n, _, a in iter_adapters(root)]
    setattr(root, ROUTE_ATTR, state)
    return state


def unroute_(root: nn.Module) -> nn.Module:
    """Restore every routed node of ``root`` to the chain of delta nodes it replaced, drop the route
    buffers and the :class:`RouteState`; returns ``root`` (unchanged when not routed)."""
    if not is_routed(root):
        return root
    for _, gm in regions(root):
        graph = gm.graph
        nodes = [n for n in graph.nodes if n.op == "call_function" and n.target is routed_delta]
        if ROUTE_BUFFER in gm._buffers and not nodes:
            del gm._buffers[ROUTE_BUFFER]
        for node in nodes:
            y, x, kind, adapters, buf, _, extra, _, _ = node.args
            remat = node.kwargs.get("remat")
            fn = ROUTED_KINDS[kind]
            with graph.inserting_before(node):
                for a, b, s, drop, _, blocks in adapters:
                    xi = graph.call_module(drop.target, (x,)) if drop is not None else x
                    args = (y, xi, a, b, s) + tuple(extra) + ((blocks,) if blocks is not None else ())
                    y = graph.call_function(fn, args, {"remat": remat} if remat is not None and drop is None
                                            and kind == "linear" else {})
            node.replace_all_uses_with(y)
            graph.erase_node(node)
            for a in list(adapters):
                if a[3] is not None and not a[3].users:
                    graph.erase_node(a[3])
            if not buf.users:
                graph.erase_node(buf)
        if ROUTE_BUFFER in gm._buffers:
            del gm._buffers[ROUTE_BUFFER]
            gm._non_persistent_buffers_set.discard(ROUTE_BUFFER)
        if nodes:
            graph.lint()
            gm.recompile()
    delattr(root, ROUTE_ATTR)
    return root
