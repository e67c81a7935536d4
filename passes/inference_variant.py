"""Inference variant of a region: factored sites computed on a cached merged weight.

:func:`inference_graph` copies a region's rewritten graph and replaces each factored site chain::

    y  = op(x, W, ...)                         # the base op (F.linear, addmm, F.embedding, a Linear call)
    y1 = <op>_delta(y, x, A1, B1, s1, ...)     # one link per adapter
    y2 = <op>_delta(y1, x, A2, B2, s2, ...)

by ``op(x, slot.weight(), ...)``: the op on the merged weight ``W + Σ ΔW``, which the slot (bound
to ``W`` and the adapters by :class:`lora_fx.inference.InferenceCache`, reached through one extra
placeholder of the variant's code) computes as fold does and keeps while nothing it was computed
from changes.  The variant is what a region runs under ``no_grad`` /
``inference_mode`` once the cache is enabled; the region's own graph is not touched.

Producers that became recompute points for the replaced chains are plain calls again in the variant
(it runs without grad, where a recompute point is the plain call anyway).

A chain is left factored (the variant still computes it exactly, on the factors) when its base op is
none of the above, when its weight is not a plain attribute of the region (a merge chain, a quantized
route), for weight-on-left matmuls, and for ops the pass does not know.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from lora_fx import ops
from lora_fx.state import state_of

from .match_act_mul import unfuse_act_mul_
from .match_recompute import restore_recompute_points_

__all__ = ["CACHE_PLACEHOLDER", "InferencePlan", "inference_graph"]

#: Name of the placeholder (and keyword) through which the variant's code reaches the cache.
CACHE_PLACEHOLDER = "_lora_fx_cache"

#: call_function base ops: target → index of the weight argument.
_WEIGHT_ARG = {F.linear: 1, torch._C._nn.linear: 1, torch.addmm: 2, F.embedding: 1,
               F.conv1d: 1, F.conv2d: 1, F.conv3d: 1}
#: call_module base ops (exact module types) → the functional form they run.
_MODULE_OPS = {nn.Linear: "linear", nn.Embedding: "embedding"}


@dataclass
class InferencePlan:
    """What :func:`inference_graph` produced for one region.

    Attributes:
        graph: the variant's graph.  Its last placeholder, :data:`CACHE_PLACEHOLDER`, takes a
            sequence of *slots*, one per entry of ``sites``; slot ``i``'s ``weight()`` returns the
            merged weight of site ``i``.
        sites: per site computed on a merged weight, ``(weight path, [adapter paths])`` relative
            to the region, the adapters in the order fold adds them.
        dropouts: paths (relative to the region) of adapter dropout modules the replaced chains
            applied; the variant equals the region only while they are in eval mode.
        modules: paths of modules the region called whose call the variant replaced by the
            functional op; the variant equals the region only while they have no hooks.
    """

    graph: fx.Graph
    sites: list[tuple[str, list[str]]] = field(default_factory=list)
    dropouts: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)


def _chain(head: fx.Node) -> list[fx.Node]:
    nodes = [head]
    while True:
        nxt = [u for u in nodes[-1].users
               if u.op == "call_function" and u.target in ops.DELTA_OPS and u.args[0] is nodes[-1]]
        if len(nxt) != 1 or len(nodes[-1].users) != 1:
            return nodes
        nodes.append(nxt[0])


def _adapter_path(link: fx.Node) -> Optional[str]:
    """``<owner>.lora.<name>.<param>`` of the adapter a delta link reads (its ``lora_A`` get_attr)."""
    a = link.args[2] if len(link.args) > 2 else None
    if not (isinstance(a, fx.Node) and a.op == "get_attr" and str(a.target).endswith(".lora_A")):
        return None
    return str(a.target).rpartition(".")[0]


def _dropout_of(link: fx.Node) -> Optional[str]:
    x = link.args[1]
    if isinstance(x, fx.Node) and x.op == "call_module" and str(x.target).endswith(".dropout"):
        return str(x.target)
    return None


def _max_norm(node: fx.Node):
    return node.args[3] if len(node.args) > 3 else node.kwargs.get("max_norm")


def _is_plain_weight(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def inference_graph(gm: fx.GraphModule) -> Optional[InferencePlan]:
    """The inference variant of region ``gm`` (see the module docstring), or None when no chain of
    ``gm`` can use a cached weight.  Pure: ``gm`` is not modified."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if any(n.args or str(n.target).startswith("*") for n in placeholders):
        return None  # defaults or variadic arguments: not a region signature
    g = copy.deepcopy(gm.graph)
    last = [n for n in g.nodes if n.op == "placeholder"]
    with g.inserting_after(last[-1]) if last else g.inserting_before(next(iter(g.nodes))):
        cache = g.placeholder(CACHE_PLACEHOLDER)
    order = {path: i for i, path in enumerate(state_of(gm).adapters)} if state_of(gm) is not None else {}
    plan = InferencePlan(graph=g)
    dead: set[fx.Node] = set()
    for head in [n for n in g.nodes if n.op == "call_function" and n.target in ops.DELTA_OPS]:
        base = head.args[0]
        if not isinstance(base, fx.Node) or (base.op == "call_function" and base.target in ops.DELTA_OPS):
            continue  # not the first link of a chain
        chain = _chain(head)
        paths = [_adapter_path(link) for link in chain]
        if None in paths or any(link.target is ops.matmul_delta and
                                (len(link.args) > 5 and link.args[5] or link.kwargs.get("weight_on_left"))
                                for link in chain):
            continue
        kind = None
        if (base.op == "call_function" and base.target in _WEIGHT_ARG and len(base.args) > _WEIGHT_ARG[base.target]
                and _is_plain_weight(base.args[_WEIGHT_ARG[base.target]])
                and not (base.target is F.embedding and _max_norm(base) is not None)):
            kind = "function"
        elif (base.op == "call_module" and type(gm.get_submodule(str(base.target))) in _MODULE_OPS and not base.kwargs
              and getattr(gm.get_submodule(str(base.target)), "max_norm", None) is None):
            kind = "module"  # (max_norm renormalises the weight in place: not on a merged copy)
        if kind is None:
            continue
        paths = sorted(paths, key=lambda p: order.get(p, len(order)))  # fold's order: the sums round alike
        with g.inserting_before(chain[-1]):
            slot = g.call_function(operator.getitem, (cache, len(plan.sites)))
            w = g.call_method("weight", (slot,))
            if kind == "function":
                i = _WEIGHT_ARG[base.target]
                plan.sites.append((str(base.args[i].target), paths))
                args = list(base.args)
                args[i] = w
                new = g.call_function(base.target, tuple(args), dict(base.kwargs))
            else:
                target = str(base.target)
                mod = gm.get_submodule(target)
                plan.sites.append((f"{target}.weight", paths))
                if _MODULE_OPS[type(mod)] == "linear":
                    new = g.call_function(F.linear, (base.args[0], w, g.get_attr(f"{target}.bias")))
                else:
                    new = g.call_function(F.embedding, (base.args[0], w, mod.padding_idx, mod.max_norm, mod.norm_type,
                                                        mod.scale_grad_by_freq, mod.sparse))
                plan.modules.append(target)
        plan.dropouts += [d for d in map(_dropout_of, chain) if d is not None]
        chain[-1].replace_all_uses_with(new)
        for link in reversed(chain):
            g.erase_node(link)
        dead.add(base)
    if not plan.sites:
        return None
    # producers only the replaced chains recomputed: the plain call (the variant runs without grad)
    restore_recompute_points_(g, ops.DELTA_OPS)
    unfuse_act_mul_(g)  # without grad the plain act(g) * u (one Python call less)
    for n in reversed(list(g.nodes)):  # what only the removed chains read (no general DCE: module calls may be impure)
        if not n.users and (n in dead or n.op == "get_attr" or
                            (n.op == "call_module" and str(n.target) in plan.dropouts)):
            g.erase_node(n)
    g.lint()
    return plan

