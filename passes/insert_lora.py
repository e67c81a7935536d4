"""Rewrite pass: register adapters and insert merge / factored nodes at the selected sites.

For each selected :class:`~lora_fx.passes.find_sites.Consumer`:

* factored (op linear in its weight, exact): after the call ``y = op(x, W)`` insert
  ``y' = <op>_delta(y, dropout(x), lora_A, lora_B, scaling)`` and rewire ``y``'s users to ``y'``;
* merge (anything else): insert ``W' = merge(W, lora_A, lora_B, scaling)`` out of place and feed
  ``W'`` to the op (for a leaf module: its functional form, or ``torch.func.functional_call``).

Base parameters are never deleted, replaced or re-registered; adapters are added as submodules
of the module owning the base parameter (``<owner>.lora.<adapter>.<param>``).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Callable

from torch import fx, nn

from lora_fx import ops, ops_experts, weights
from lora_fx.errors import ConfigError, LoraFxWarning
from lora_fx.rules import MERGE, Factored, choose_lowering, function_rule, module_rule
from lora_fx.regions import set_unregistered_holder_, unregistered_holder
from lora_fx.state import (ADAPTER_ATTR, STATE_ATTR, AdapterRecord, GraphState, adapter_path, region_of, regions,
                           state_of)

from .find_sites import Consumer, _weight_slot, consuming_users
from .match_act_mul import fuse_act_mul_
from .match_recompute import mark_recompute_points_, remat_spec

if TYPE_CHECKING:  # annotations only: passes never import the adapters package
    from lora_fx.adapters.module import LoraAdapter

__all__ = ["insert_lora", "LOWERINGS"]

LOWERINGS = ("auto", "factored", "merge")


def _register(gm: fx.GraphModule, module: nn.Module, param: str, adapter_name: str, adapter: LoraAdapter, *,
              shared: bool = False) -> str:
    """Register ``adapter`` under the module owning ``param`` (``<owner>.lora.<name>.<param>``),
    ``module`` being the module ``gm`` runs as (``gm`` itself, or the module of a region, which
    shares its tables).  ``shared``: the adapter is registered under another owner already (a tied
    weight in a model that kept its class): this owner holds its holder unregistered, so
    ``state_dict`` has one copy (an owner that holds adapters of its own too registers it: both)."""
    path = adapter_path(param, adapter_name)
    owner_path, _, pname = param.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    holder = owner._modules.get(ADAPTER_ATTR)
    if holder is None:
        holder = unregistered_holder(owner)
        if holder is not None and not shared:  # an own adapter joins: the holder must be registered
            set_unregistered_holder_(owner, None)
            owner.add_module(ADAPTER_ATTR, holder)
    if holder is None:
        if hasattr(owner, ADAPTER_ATTR):
            raise ConfigError(
                f"module '{owner_path or '<root>'}' ({type(owner).__name__}) already has an attribute "
                f"'{ADAPTER_ATTR}', where lora_fx keeps adapters; rename that attribute or exclude "
                f"'{param}' with exclude=[...]")
        holder = nn.ModuleDict()
        if shared:
            set_unregistered_holder_(owner, holder)
        else:
            owner.add_module(ADAPTER_ATTR, holder)
    if adapter_name not in holder:
        holder[adapter_name] = nn.ModuleDict()
    holder[adapter_name][pname] = adapter
    holder.train(owner.training)  # a new adapter (its dropout) follows its owner's mode
    return path


def _get_attr(graph: fx.Graph, target: str) -> fx.Node:
    """``graph.get_attr(target)`` without its existence check (every target here was registered
    just before, and the check walks the module path once per node)."""
    return graph.create_node("get_attr", target)


def _delta_node(gm: fx.GraphModule, f: Factored, y, path: str, adapter: LoraAdapter, remat: bool = True) -> fx.Node:
    """Emit ``f.fn(y, dropout(x), lora_A, lora_B, scaling, *extra[, blocks])`` at the insertion
    point, with dropout where the adapter has one and ``f.dropout``; a recomputable form
    (``f.recompute``) without dropout also gets ``remat=`` when its input's producer can be recomputed."""
    graph = gm.graph
    x = f.x
    dropout = hasattr(adapter, "dropout")
    if dropout and f.dropout:
        x = graph.call_module(f"{path}.dropout", (x,))
    args = (y, x, _get_attr(graph, f"{path}.lora_A"), _get_attr(graph, f"{path}.lora_B"),
            _get_attr(graph, f"{path}.scaling")) + tuple(f.extra) + _layout(adapter)
    spec = remat_spec(graph, gm, f.x) if remat and f.recompute and not dropout else None
    return graph.call_function(f.fn, args, {"remat": spec} if spec else {})


def _layout(adapter: LoraAdapter) -> tuple:
    """Extra trailing argument of a fused adapter's op (``blocks`` of :mod:`lora_fx.ops`)."""
    return () if adapter.layout is None else (adapter.layout,)


def _merge_node(graph: fx.Graph, weight: fx.Node, path: str, adapter: LoraAdapter) -> fx.Node:
    """Emit ``W' = merge(W, ...)`` per :data:`lora_fx.rules.MERGE` (DoRA: its own merge); for an
    expert adapter, the lazy ``W' = lora_weight(W, A, B, s, transposed, dropout)`` its consumers
    compute factored per expert (LoRA dropout on their inputs)."""
    if getattr(adapter, "experts", None) is not None:
        drop = _get_attr(graph, f"{path}.dropout") if hasattr(adapter, "dropout") else None
        return graph.call_function(ops_experts.lora_weight, (
            weight, _get_attr(graph, f"{path}.lora_A"), _get_attr(graph, f"{path}.lora_B"),
            _get_attr(graph, f"{path}.scaling"), adapter.transposed, drop))
    a = _get_attr(graph, f"{path}.lora_A")
    if hasattr(adapter, "dropout") and MERGE.dropout_on_A:  # DropConnect on lora_A
        a = graph.call_module(f"{path}.dropout", (a,))
    b, s = _get_attr(graph, f"{path}.lora_B"), _get_attr(graph, f"{path}.scaling")
    if getattr(adapter, "use_dora", False):
        # alpha / rank as a buffer, not a constant: a hot-swap of rank or alpha reaches the graph
        return graph.call_function(MERGE.dora_fn, (weight, a, b, s, _get_attr(graph, f"{path}.lora_magnitude"),
                                                   _get_attr(graph, f"{path}.base_scale")))
    return graph.call_function(MERGE.fn, (weight, a, b, s) + _layout(adapter))


def _readable(gm: fx.GraphModule, attr: fx.Node, site: Consumer) -> fx.Node:
    """``attr`` (a ``get_attr`` of a base weight) as the float tensor a merge reads: the node itself
    for a plain weight, else ``dequantized(W)`` (:mod:`lora_fx.weights`), with a warning: the merge
    materialises a float copy of the weight every forward."""
    w = gm.get_parameter(attr.target)
    if weights.is_plain(w):
        return attr
    shape, dtype = weights.logical_shape(w), weights.compute_dtype(w)
    mib = math.prod(shape) * dtype.itemsize / 2**20
    warnings.warn(
        f"'{site.fqn}' is a {weights.kind_of(w).name} weight used by {site.op}, which is lowered by merging "
        f"(the op is not linear in the weight, its quantized type does not compute it, or lowering='merge' / DoRA): "
        f"every forward dequantizes it and feeds the op a {dtype} {tuple(shape)} copy ({mib:.2f} MiB), kept until "
        "backward. Exclude it (exclude=[...]) to keep the layer quantized only.", LoraFxWarning,
        stacklevel=6)  # the caller of transform / add_adapter
    return gm.graph.call_function(ops.dequantized, (attr,))


def _tail(node: fx.Node, chain_ops) -> fx.Node:
    """Last node of the chain of ``chain_ops`` calls hanging off ``node`` (each taking the previous
    one as first argument): where a further adapter on the same value is appended."""
    while True:
        nxt = next((u for u in node.users if u.op == "call_function" and u.target in chain_ops
                    and u.args[0] is node), None)
        if nxt is None:
            return node
        node = nxt


def _inserted(after: fx.Node, anchor: fx.Node) -> set:
    """Nodes inserted between ``after`` and ``anchor`` (its old successor): O(inserted), not O(graph)."""
    out, n = set(), after.next
    while n is not anchor:
        out.add(n)
        n = n.next
    return out


def _rewire(tail: fx.Node, new: fx.Node, created: set) -> None:
    """Make every user of ``tail`` except the nodes just ``created`` read ``new``."""
    tail.replace_all_uses_with(new, delete_user_cb=lambda u: u not in created)


def _lower_module(gm, node, items, mode, remat=True) -> list[tuple[Consumer, str]]:
    graph = gm.graph
    mod = gm.get_submodule(node.target)
    rule = module_rule(mod)
    forms = [rule.factored(node, mod, c.param[len(node.target) + 1:]) if c.factorable else None for c, _, _ in items]
    # a leaf with forward hooks is called through functional_call, so its hooks see the adapted output
    hooked = bool(mod._forward_hooks or mod._forward_pre_hooks)
    if not hooked and all(choose_lowering(mode, [f], a, c.shape) == "factored" for f, (c, a, _) in zip(forms, items)):
        tail = _tail(node, ops.DELTA_OPS)  # earlier adapters' delta chain: append after it
        anchor = tail.next
        with graph.inserting_before(anchor):
            y = tail
            for f, (c, adapter, path) in zip(forms, items):
                y = _delta_node(gm, f, y, path, adapter, remat)
        _rewire(tail, y, _inserted(tail, anchor))
        return [(c, "factored") for c, _, _ in items]
    with graph.inserting_before(node):
        merged: dict[str, fx.Node] = {}
        for c, adapter, path in items:
            pname = c.param[len(node.target) + 1:]
            w = merged[pname] if pname in merged else _readable(gm, _get_attr(graph, c.param), c)
            merged[pname] = _merge_node(graph, w, path, adapter)
        # a rule's own merged call covers the weights it names; any other parameter goes through functional_call
        own = rule.merged_call is not None and not hooked and set(merged) <= set(rule.weights(mod))
        new = rule.merged_call(graph, node, mod, merged) if own else None
        if new is None:
            new = graph.call_function(ops.module_call, (_get_attr(graph, node.target), merged) + tuple(node.args),
                                      dict(node.kwargs))
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return [(c, "merge") for c, _, _ in items]


def _lower_attr(gm, node, items, mode, remat=True) -> list[tuple[Consumer, str]]:
    graph = gm.graph
    weight = _tail(node, ops.MERGE_OPS)  # earlier adapters' merge chain: the weight the ops see
    shape = tuple(items[0][0].shape)

    def form(user):  # analysis guarantees every use of a factorable weight has a weight slot and a rule
        return function_rule(user.target).factored(user, _weight_slot(user, weight), shape)

    forms = [form(u) for u in consuming_users(weight)] if all(c.factorable for c, _, _ in items) else []
    if all(choose_lowering(mode, forms, a, c.shape) == "factored" for c, a, _ in items):
        for user in consuming_users(weight):  # metadata reads (W.dtype, W.shape) keep reading W
            f = form(user)  # now: its input may be the output of a site rewired just before (a tied weight)
            tail = _tail(user, ops.DELTA_OPS)
            anchor = tail.next
            with graph.inserting_before(anchor):
                y = tail
                for _, adapter, path in items:
                    y = _delta_node(gm, f, y, path, adapter, remat)
            _rewire(tail, y, _inserted(tail, anchor))
        return [(c, "factored") for c, _, _ in items]
    anchor = weight.next
    with graph.inserting_before(anchor):
        w = _readable(gm, weight, items[0][0]) if weight is node else weight  # a chain's first adapter: read W
        for _, adapter, path in items:
            w = _merge_node(graph, w, path, adapter)
    _rewire(weight, w, _inserted(weight, anchor))
    return [(c, "merge") for c, _, _ in items]


def insert_lora(
    root: nn.Module,
    selected: list[Consumer],
    make_adapter: Callable[[Consumer], LoraAdapter],
    *,
    adapter_name: str = "default",
    lowering: str = "auto",
    recompute_inputs: bool = True,
) -> nn.Module:
    """Register one adapter per targeted parameter object and lower every selected consumer.

    Args:
        root: the lora_fx GraphModule hierarchy (modified in place; the caller owns it).
        selected: consumers to adapt (from :func:`~lora_fx.passes.find_sites.find_sites`).
        make_adapter: builds the adapter for the first consumer of a parameter object.
        adapter_name: name under which adapters are registered.
        lowering: ``"auto"`` | ``"factored"`` | ``"merge"``.
        recompute_inputs: attach ``remat`` specs to factored linear sites (:mod:`lora_fx.recompute`),
            and rewrite gated activations ``act(g) * u`` of every graph under ``root`` into
            :func:`lora_fx.act_mul.act_mul`.

    Returns:
        ``root``.  Aliases of one parameter object that are all targeted share one adapter;
        consumers of untargeted aliases are left alone.
    """
    gms = dict(regions(root))
    modules = {p: root.get_submodule(p) if p else root for p in gms}  # what each graph runs as
    by_param: dict[int, LoraAdapter] = {}
    first: dict[int, str] = {}  # id(adapter) -> path of the graph it was registered in first
    paths: dict[tuple[str, int], str] = {}  # (gm path, id(adapter)) -> registered module path
    groups: dict[tuple[str, str], list] = {}
    for c in selected:
        gm = gms[c.gm_path]
        param = gm.get_parameter(c.param)
        adapter = by_param.get(id(param))
        if adapter is None:
            adapter = by_param[id(param)] = make_adapter(c)
        st = state_of(gm)
        if st is None:
            st = GraphState()
            setattr(gm, STATE_ATTR, st)
        path = paths.get((c.gm_path, id(adapter)))
        if path is None:
            module = modules[c.gm_path]
            shared = first.setdefault(id(adapter), c.gm_path) != c.gm_path and region_of(module) is gm
            path = paths[(c.gm_path, id(adapter))] = _register(gm, module, c.param, adapter_name, adapter,
                                                                shared=shared)
            st.adapters[path] = AdapterRecord(param=c.param, adapter=adapter_name)
        if c.param not in st.adapters[path].aliases:
            st.adapters[path].aliases.append(c.param)
        groups.setdefault((c.gm_path, c.node), []).append((c, adapter, path))
    fused = set()
    if recompute_inputs:  # gated activations keep act's input, not its output (lora_fx.act_mul)
        for p, g in gms.items():
            if fuse_act_mul_(g.graph, keep={name for q, name in groups if q == p}):
                fused.add(p)
    nodes_by_name = {p: {n.name: n for n in gms[p].graph.nodes} for p in {k[0] for k in groups}}
    for (gm_path, node_name), items in groups.items():
        gm = gms[gm_path]
        node = nodes_by_name[gm_path][node_name]
        lower = _lower_module if node.op == "call_module" else _lower_attr
        for (c, how), (_, _, path) in zip(lower(gm, node, items, lowering, recompute_inputs), items):
            if c.stack is not None:  # a lazy weight: factored per expert where its consumers allow
                how = "factored" if c.stack.factored else "merge"
            state_of(gm).adapters[path].consumers.append((c.node, c.op, how))
    for gm_path in {k[0] for k in groups} | fused:  # only rewritten graphs need new code
        mark_recompute_points_(gms[gm_path], ops.DELTA_OPS)  # recomputation under torch.compile
        gms[gm_path].graph.lint()
        gms[gm_path].recompile()
    return root
