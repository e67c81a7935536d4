"""Rewrite gated activations ``act(g) * u`` into :func:`lora_fx.act_mul.act_mul` (and back).

:func:`fuse_act_mul_` matches a ``mul`` of two nodes one of which is ``silu(g)`` or ``gelu(g,
approximate=...)`` (``F.silu`` / ``F.gelu``, their ``torch._C._nn`` and ATen forms; not in place)
whose only user is that ``mul``, and turns the ``mul`` node in place into ``act_mul(g, u, act=...)``
(it keeps its name and users); the activation node, now unused, is erased.  Leaf activation
modules (``nn.SiLU`` called as a module) are left alone: their hooks are read as they run.
:func:`unfuse_act_mul_` turns every ``act_mul`` node back into the two plain calls (for code
that runs without grad, and for folded graphs, which hold no lora_fx op).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from lora_fx.act_mul import act_mul

__all__ = ["fuse_act_mul_", "unfuse_act_mul_"]

_aten = torch.ops.aten
_MUL = {operator.mul, torch.mul, _aten.mul.Tensor}
_SILU = {F.silu, torch._C._nn.silu, _aten.silu.default}
_GELU = {F.gelu, torch._C._nn.gelu, _aten.gelu.default}
_ORIGINAL = "lora_fx_act_mul"


def _activation(n) -> tuple[str, fx.Node, str] | None:
    """``(act, g, approximate)`` when ``n`` is a matched activation call, else None."""
    if not isinstance(n, fx.Node) or n.op != "call_function" or len(n.users) != 1:
        return None
    names = ("input", "approximate") if n.target in _GELU else ("input", "inplace")
    vals = dict(zip(names, n.args))
    vals.update(n.kwargs)
    if set(vals) - set(names) or not isinstance(vals.get("input"), fx.Node):
        return None
    if n.target in _SILU and vals.get("inplace", False) is False:
        return "silu", vals["input"], "none"
    if n.target in _GELU and vals.get("approximate", "none") in ("none", "tanh"):
        return "gelu", vals["input"], vals.get("approximate", "none")
    return None


def _order(graph: fx.Graph) -> dict[fx.Node, int]:
    return {n: i for i, n in enumerate(graph.nodes)}


def _reads(g: fx.Node, stop: fx.Node, order: dict[fx.Node, int]) -> set[fx.Node]:
    """``g`` and every node before ``stop`` computed from it, directly or through others (its views,
    in-place ops on it or on them, anything handed them); ``order``: the graph's node positions."""
    end = order[stop]
    seen, todo = {g}, [g]
    while todo:
        for user in todo.pop().users:
            if user not in seen and order[user] < end:
                seen.add(user)
                todo.append(user)
    return seen


def _nothing_reads_between(g: fx.Node, a: fx.Node, mul: fx.Node) -> bool:
    """Whether no node strictly between the activation ``a`` and ``mul`` reads ``g`` (or a value
    computed from it): then ``act(g)`` computed at the ``mul`` sees the ``g`` it saw (no in-place
    write on ``g`` or an alias of it comes between), and ``g``'s gradient is accumulated in the
    same order (the backward node moves from ``a``'s place to ``mul``'s, past no other reader)."""
    order = _order(g.graph)
    lo, hi = order[a], order[mul]
    return not any(lo < order[n] < hi for n in _reads(g, mul, order))


def _after_last_read(g: fx.Node, mul: fx.Node) -> fx.Node:
    """The node after which ``act(g)`` goes back when unfused: ``g``, or the last node before ``mul``
    computed from ``g`` (an in-place write on ``g`` the activation read after)."""
    order = _order(g.graph)
    return max(_reads(g, mul, order), key=order.__getitem__)


def fuse_act_mul_(graph: fx.Graph, keep=frozenset()) -> int:
    """Rewrite every matched ``act(g) * u`` of ``graph`` in place, except ``mul`` nodes named in
    ``keep`` (weight consumers) and products with a parameter or buffer (``get_attr``); returns how
    many (the caller recompiles)."""
    done = 0
    for node in list(graph.nodes):
        if (node.op != "call_function" or node.target not in _MUL or len(node.args) != 2 or node.kwargs
                or node.name in keep or not all(isinstance(a, fx.Node) and a.op != "get_attr" for a in node.args)):
            continue
        for i in (0, 1):
            found = _activation(node.args[i])
            if found is None:
                continue
            act, g, approximate = found
            a, u = node.args[i], node.args[1 - i]
            # u is g (act(g) * g): one backward node would hand g both its gradients in another order
            if u is a or u is g or not _nothing_reads_between(g, a, node):
                break
            # what unfusing restores: the calls as they were (function or ATen forms, operand order)
            node.meta[_ORIGINAL] = (a.target, tuple(a.args[1:]), dict(a.kwargs), node.target, i)
            node.target, node.args = act_mul, (g, u)
            node.kwargs = {"act": act} if act == "silu" else {"act": act, "approximate": approximate}
            graph.erase_node(a)
            done += 1
            break
    return done


def unfuse_act_mul_(graph: fx.Graph) -> int:
    """Turn every ``act_mul`` node of ``graph`` back into ``act(g) * u`` (``F.silu`` / ``F.gelu``
    and ``operator.mul``, in place: the node becomes the ``mul``); returns how many."""
    done = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not act_mul:
            continue
        g, u = node.args
        act = node.kwargs.get("act", "silu")
        approximate = node.kwargs.get("approximate", "none")
        default = ((F.silu, (), {}, operator.mul, 0) if act == "silu"
                   else (F.gelu, (), {"approximate": approximate}, operator.mul, 0))
        act_target, act_args, act_kwargs, mul_target, i = node.meta.get(_ORIGINAL, default)
        # where the model computed it: after g and whatever it read of g (fuse left nothing that reads g
        # between the activation and the mul), before the mul when that is still among the inputs
        last = _after_last_read(g, node)
        with (graph.inserting_before(node) if last.op == "placeholder" else graph.inserting_after(last)):
            a = graph.call_function(act_target, (g,) + act_args, act_kwargs)
        node.target, node.args, node.kwargs = mul_target, ((a, u) if i == 0 else (u, a)), {}
        done += 1
    return done
