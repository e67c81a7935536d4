"""Removal pass: take adapters out of a lora_fx ``GraphModule`` (its graph, modules and records).

One pass serves both callers: :func:`lora_fx.delete_adapter` removes one adapter's nodes and
modules, leaving the others; fold (:mod:`.fold`) removes every adapter after their deltas were
written into new weights.
"""

from __future__ import annotations

from typing import Collection, Optional

from torch import fx, nn

from lora_fx import ops
from lora_fx.regions import set_unregistered_holder_, unregistered_holder
from lora_fx.state import ADAPTER_ATTR, STATE_ATTR, state_of

from .match_act_mul import unfuse_act_mul_
from .match_recompute import restore_recompute_points_

__all__ = ["remove_lora_"]


def _strip_nodes(graph: fx.Graph, prefixes: tuple[str, ...], everything: bool) -> None:
    def ours(n: fx.Node) -> bool:  # reads one of the adapters being removed
        return n.op in ("get_attr", "call_module") and isinstance(n.target, str) and n.target.startswith(prefixes)

    lora = set(ops.MERGE_OPS) | set(ops.DELTA_OPS)
    freed: set[fx.Node] = set()  # get_attr nodes only a removed node read (a recompute spec's leaf module)

    def drop(node: fx.Node, replacement) -> None:
        freed.update(n for n in node.all_input_nodes if n.op == "get_attr")
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)

    for node in list(graph.nodes):  # each merge / delta node becomes the value it adapted
        if node.op == "call_function" and node.target in lora and (
                everything or any(isinstance(a, fx.Node) and ours(a) for a in node.args[1:])):
            drop(node, node.args[0])
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if everything and node.target is ops.module_call:  # an opaque leaf is a plain call again
            with graph.inserting_before(node):
                call = graph.call_module(node.args[0].target, tuple(node.args[2:]), dict(node.kwargs))
            drop(node, call)
        elif node.target is ops.dequantized and not any(u.op == "call_function" and u.target in ops.MERGE_OPS
                                                        for u in node.users):
            drop(node, node.args[0])  # the head of a merge chain that has no merge left
    restore_recompute_points_(graph, ops.DELTA_OPS)  # producers no recomputing site reads any more
    if everything:  # a plain graph again: gated activations as the model wrote them
        unfuse_act_mul_(graph)
    for node in reversed(list(graph.nodes)):
        if (ours(node) or node in freed) and not node.users:
            graph.erase_node(node)


def _drop_modules(module: nn.Module, paths: Collection[str]) -> None:
    for path in paths:  # "<owner>.lora.<adapter>.<param>", relative to the module the graph runs as
        *owner_path, _, name, pname = path.rsplit(".", 3)
        owner_path = owner_path[0] if owner_path else ""
        try:
            owner = module.get_submodule(owner_path) if owner_path else module
        except AttributeError:  # removed already: an owner module reached from another graph
            continue
        holder = owner._modules.get(ADAPTER_ATTR)
        if holder is None:
            holder = unregistered_holder(owner)  # a tied weight's second owner
            if holder is None:
                continue
        per_name = holder._modules.get(name)
        if per_name is not None:
            if pname in per_name:
                del per_name[pname]
            if len(per_name) == 0:
                del holder[name]
        if len(holder) == 0:
            if owner._modules.get(ADAPTER_ATTR) is holder:
                del owner._modules[ADAPTER_ATTR]
            else:
                set_unregistered_holder_(owner, None)


def remove_lora_(gm: fx.GraphModule, paths: Optional[Collection[str]] = None, *,
                 module: Optional[nn.Module] = None, rewrite: bool = True) -> fx.GraphModule:
    """Remove the adapters at module ``paths`` (relative to ``gm``; None: every adapter of ``gm``)
    from ``gm`` in place; returns ``gm``.

    * graph: each merge / delta node reading one of them is replaced by its first argument (the
      value it adapted); nodes that read one of them, or that only a removed node read, are erased
      once unused.  With every adapter removed, opaque leaves called through
      :func:`lora_fx.ops.module_call` become plain ``call_module`` nodes again; a
      :func:`lora_fx.ops.dequantized` head left without a merge is dropped; a
      :func:`lora_fx.ops.recompute_point` no recomputing site reads is the original call again.
    * modules: the adapter modules, and their holders once empty;
    * records: their :class:`~lora_fx.state.AdapterRecord` s (the state attribute goes with the last).

    Base parameters are never touched.  The graph is linted and recompiled.

    Args:
        module: the module ``gm`` runs as, when ``gm`` is a region (:func:`lora_fx.state.regions`).
        rewrite: False leaves the graph as it is (fold of a model that kept its class discards
            its regions anyway); modules and records are removed all the same.
    """
    st = state_of(gm)
    if st is None:
        return gm
    everything = paths is None
    paths = list(st.adapters) if everything else [p for p in paths if p in st.adapters]
    if not paths:
        if everything:  # an empty record set: the module is no longer a lora_fx GraphModule
            delattr(gm, STATE_ATTR)
        return gm
    if rewrite:
        _strip_nodes(gm.graph, tuple(f"{p}." for p in paths), everything)
    _drop_modules(gm if module is None else module, paths)
    for p in paths:
        del st.adapters[p]
    if not st.adapters:
        delattr(gm, STATE_ATTR)
    if rewrite:
        gm.graph.lint()
        gm.recompile()
    return gm
