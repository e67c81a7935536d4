"""Analysis pass: which parameters reach which weight-consuming ops (pure: returns data).

For every lora_fx ``GraphModule`` in a hierarchy it lists one :class:`Consumer` per
(parameter, consuming node): a ``call_module`` node of a leaf owning the parameter, or a
``get_attr`` node of the parameter, whose users are classified by following view-like ops
(``W.t()``, ``W.view(...)``) to the first real consumers (networkx reachability).  Reads of a
weight's metadata (``W.dtype``, ``W.device``, ``W.shape``, ``W.size()``, ...; a Gemma-style scaled
embedding reads ``self.weight.dtype``) do not consume its value and are not users here
(:func:`consuming_users`).  Every consumer that is not a default target carries the reason
(``Consumer.left_out``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import networkx as nx
import torch
from torch import fx, nn

from lora_fx import weights
from lora_fx.ops import MERGE_OPS, module_call
from lora_fx.rules import VIEW_OPS, function_rule, module_rule
from lora_fx.state import capture_of, is_adapter_path, regions


__all__ = ["Consumer", "find_sites", "consuming_users", "is_metadata_read"]

#: Tensor attributes that describe a weight without reading its values.
_METADATA_ATTRS = frozenset({"dtype", "device", "shape", "ndim", "layout", "is_cuda", "is_meta", "is_sparse",
                             "is_quantized", "requires_grad", "is_leaf", "names"})
#: Tensor methods that describe a weight without reading its values.
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "get_device", "is_floating_point",
                               "is_complex", "is_contiguous", "element_size", "stride", "type"})


@dataclass(frozen=True)
class Consumer:
    """One (parameter, consuming node) pair.

    Attributes:
        gm_path: path of the ``GraphModule`` holding the node (``""`` for the root).
        node: name of the ``call_module`` or ``get_attr`` node.
        param: parameter name relative to that ``GraphModule`` (the alias the node uses).
        fqn: fully qualified parameter name in the root.
        op: op kind (``"linear"``, ``"conv2d"``, ``"matmul"``, ``"mha"``, ...).
        shape: the parameter's logical shape (:func:`lora_fx.weights.logical_shape`).
        default: adapted when ``targets`` is None (a weight of a known weight-consuming op).
        reason: why the site cannot be adapted, or None.
        left_out: why the default targets leave it out (``reason`` when it cannot be adapted;
            None exactly when ``default``).
        factorable: the factored lowering is exact for every use (and, for a quantized weight,
            its type computes the op itself: :func:`lora_fx.weights.runs`).
        blocks: the op's default fused layout of the weight's output rows,
            ``((block name, rows), ...)`` (MHA ``in_proj_weight``: q, k, v), or ``()``.
    """

    gm_path: str
    node: str
    param: str
    fqn: str
    op: str
    shape: tuple[int, ...]
    default: bool
    reason: Optional[str]
    factorable: bool
    blocks: tuple[tuple[str, int], ...] = ()
    left_out: Optional[str] = None


def is_metadata_read(n: fx.Node) -> bool:
    """Whether ``n`` only reads metadata of its first argument (``W.dtype``, ``W.size()``, ...)."""
    if n.op == "call_function" and n.target is getattr and len(n.args) >= 2:
        return n.args[1] in _METADATA_ATTRS
    return n.op == "call_method" and n.target in _METADATA_METHODS


def consuming_users(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its value (metadata reads left out)."""
    return [u for u in node.users if not (is_metadata_read(u) and u.args and u.args[0] is node)]


def _slots(user: fx.Node, node: fx.Node) -> list[tuple[int, str]]:
    found = [(i, "") for i, a in enumerate(user.args) if a is node]
    found += [(-1, k) for k, v in user.kwargs.items() if v is node]
    return found


def _weight_slot(user: fx.Node, node: fx.Node) -> Optional[int]:
    """Index of the weight slot ``node`` occupies in ``user`` per its rule, else None."""
    if user.op not in ("call_function", "call_method"):
        return None
    rule = function_rule(user.target)
    if rule is None:
        return None
    slots = _slots(user, node)
    if len(slots) != 1:
        return None
    index, kw = slots[0]
    for slot_index, slot_name in rule.weight_slots:
        if index == slot_index or (kw and kw == slot_name):
            return slot_index
    return None


def _terminal_users(dg: nx.DiGraph, node: fx.Node) -> list[fx.Node]:
    """Users of ``node`` reached through view-like ops only, stopping at the first real op
    (metadata reads are not users)."""
    views = nx.subgraph_view(dg, filter_edge=lambda u, v: u is node or _is_view(u))
    return [dst for src, dst in nx.bfs_edges(views, node)
            if not _is_view(dst) and not (is_metadata_read(dst) and dst.args and dst.args[0] is src)]


def _is_view(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and _hashable_in(n.target, VIEW_OPS)


def _hashable_in(target, table) -> bool:
    try:
        return target in table
    except TypeError:
        return False


def _kind(n: fx.Node) -> str:
    rule = function_rule(n.target) if n.op in ("call_function", "call_method") else None
    if rule is not None:
        return rule.kind
    if n.op == "output":
        return "output"
    name = getattr(n.target, "__name__", str(n.target))
    return f"{n.op}:{name}"


def _module_consumers(gm: fx.GraphModule, gm_path: str, node: fx.Node) -> list[Consumer]:
    mod = gm.get_submodule(node.target)
    if isinstance(mod, fx.GraphModule) or capture_of(mod) is not None:
        return []  # a traced block, or a module the regions front-end captured on its own: sites found there
    rule = module_rule(mod)
    defaults = set(rule.weights(mod))
    kind = rule.kind(mod)
    out = []
    for pname, p in mod.named_parameters():
        if is_adapter_path(pname):
            continue
        reason = weights.reason(p)
        param = f"{node.target}.{pname}"
        default = reason is None and pname in defaults
        out.append(Consumer(
            gm_path=gm_path, node=node.name, param=param, fqn=f"{gm_path}.{param}" if gm_path else param,
            op=kind, shape=weights.logical_shape(p), default=default, reason=reason,
            factorable=reason is None and rule.factored(node, mod, pname) is not None and weights.runs(p, kind),
            blocks=tuple(rule.blocks(mod, pname)) if reason is None else (),
            left_out=None if default else reason or _leaf_reason(node.target, mod, pname, defaults)))
    return out


def _leaf_reason(path: str, mod: nn.Module, pname: str, defaults: set) -> str:
    """Why the default targets leave out parameter ``pname`` of the opaque leaf ``mod``."""
    what = f"used inside the opaque leaf module '{path}' ({type(mod).__name__})"
    if defaults:
        return (f"{what}, whose op-table rule adapts {sorted(defaults)} by default, not {pname!r}; target it by "
                "name to adapt it (merged, through torch.func.functional_call)")
    return (f"{what}, which has no op-table rule; target it by name to adapt it (merged, through "
            "torch.func.functional_call), or register a rule with lora_fx.register_module_rule")


def _merge_tail(node: fx.Node) -> fx.Node:
    """End of the chain of lora_fx merge calls (``merge``, ``dora_merge``) on a weight node."""
    while True:
        nxt = next((u for u in node.users if u.op == "call_function" and u.target in MERGE_OPS
                    and u.args[0] is node), None)
        if nxt is None:
            return node
        node = nxt


def _attr_consumer(gm: fx.GraphModule, gm_path: str, dg: nx.DiGraph, node: fx.Node) -> Optional[Consumer]:
    attr = node
    try:
        p = gm.get_parameter(node.target)
    except AttributeError:
        return None  # a buffer or constant
    if is_adapter_path(node.target):
        return None
    reason = weights.reason(p)
    shape = weights.logical_shape(p)
    node = _merge_tail(node)  # an adapted weight: its consumers are those of the merged value
    direct = consuming_users(node)
    terminals = _terminal_users(dg, node)
    kinds = sorted({_kind(t) for t in terminals})
    known = terminals and all(function_rule(t.target) is not None and t.op != "output" for t in terminals)
    direct_slots = [_weight_slot(u, node) for u in direct]
    factorable = reason is None and all(
        s is not None and function_rule(u.target).factored(u, s, shape) is not None
        and weights.runs(p, function_rule(u.target).kind)  # a quantized weight: only where its type computes the op
        for u, s in zip(direct, direct_slots))
    calls = [u for u in direct if u.op == "call_function" and u.target is module_call]
    if node is not attr and calls and len(calls) == len(direct):  # an opaque leaf lowered earlier
        owner = calls[0].args[0].target
        mod = gm.get_submodule(owner)
        rule = module_rule(mod)
        pname = attr.target[len(owner) + 1:]
        default = reason is None and pname in rule.weights(mod)
        return Consumer(
            gm_path=gm_path, node=attr.name, param=attr.target,
            fqn=f"{gm_path}.{attr.target}" if gm_path else attr.target, op=rule.kind(mod), shape=shape,
            default=default, reason=reason, factorable=False,
            left_out=None if default else reason or _leaf_reason(owner, mod, pname, set(rule.weights(mod))))
    viewed = any(_is_view(u) for u in direct)
    blocks = next((tuple(b) for u, s in zip(direct, direct_slots) if s is not None
                   for b in [function_rule(u.target).blocks(u, s, shape)] if b), ())
    op = "+".join(kinds) + (" (via view)" if viewed else "")
    default = bool(reason is None and known and (viewed or all(s is not None for s in direct_slots)))
    return Consumer(
        gm_path=gm_path, node=attr.name, param=attr.target,
        fqn=f"{gm_path}.{attr.target}" if gm_path else attr.target, op=op or "unused", shape=shape,
        default=default, reason=reason, factorable=bool(factorable and direct), blocks=blocks if reason is None else (),
        left_out=None if default else reason or _attr_reason(terminals, direct, direct_slots))


def _attr_reason(terminals: list[fx.Node], direct: list[fx.Node], slots: list) -> str:
    """Why the default targets leave out a weight read by ``get_attr`` (not consumed by a known
    weight slot of a known op)."""
    if not terminals:
        return "its value is not used by the forward (only read for its metadata, or not at all)"
    unknown = sorted({_kind(t) for t in terminals if function_rule(t.target) is None or t.op == "output"})
    if unknown:
        shown = ", ".join(unknown[:4]) + (", ..." if len(unknown) > 4 else "")
        return (f"consumed by {shown}, not a weight-consuming op lora_fx knows (linear, conv, embedding, matmul, "
                "attention); target it by name to adapt it (merged: the op sees W + ΔW), or register a rule with "
                "lora_fx.register_function_rule")
    return ("a known op reads it in a slot other than its weight; target it by name to adapt it (merged: the op "
            "sees W + ΔW)")


def find_sites(root: nn.Module) -> list[Consumer]:
    """All (parameter, consuming node) pairs in ``root``'s lora_fx ``GraphModule`` hierarchy,
    in graph order, root first.  Adapter parameters are never listed."""
    out: list[Consumer] = []
    for gm_path, gm in regions(root):
        dg = None  # built on the first get_attr node (a graph of leaf calls only needs none)
        for n in gm.graph.nodes:
            if n.op == "call_module":
                out.extend(_module_consumers(gm, gm_path, n))
            elif n.op == "get_attr":
                if dg is None:
                    dg = nx.DiGraph()
                    for m in gm.graph.nodes:
                        dg.add_node(m)
                        for u in m.users:
                            dg.add_edge(m, u)
                c = _attr_consumer(gm, gm_path, dg, n)
                if c is not None:
                    out.append(c)
    return out
