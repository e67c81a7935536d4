"""The code an adapted graph runs: a linear site's base op and first adapter as one call.

:func:`linear_site_graph` copies a graph and replaces each pair::

    y  = F.linear(x, W, b)        # or  y = self.fc(x)  (an nn.Linear called as a module)
    y1 = linear_delta(y, x_in, A, B, s, remat=...)

by ``y1 = linear_site(layer, x, x_in, A, B, s, remat=...)`` (:func:`lora_fx.linear_site.linear_site`,
which computes on the merged weight where that is exact and cheaper, and is the same two calls
otherwise).  ``x_in`` is ``x`` itself or the adapter output of the recompute point ``x`` comes
from (the site has no dropout); further adapters on the site stay factored links on top.

A pair is left as it is when the base op has another user, reads its weight other than as a plain
attribute, or is not a ``Linear`` module call; when the delta has fused blocks or its factors are
not attributes; and when anything but attribute reads comes between the two (the fused call runs at
the delta's place: nothing may change ``x`` in between).

The graph module's *graph* keeps the factored chain every pass reads; only its generated code
(:class:`lora_fx.graph_module.LoraGraphModule`) comes from this copy.
"""

from __future__ import annotations

import copy
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from lora_fx import ops
from lora_fx.graph_module import register_code_rewrite
from lora_fx.linear_site import linear_site
from lora_fx.recompute import recompute_point

__all__ = ["linear_site_graph"]

_LINEAR = {F.linear, torch._C._nn.linear}


def _function_layer(base: fx.Node):
    """``(x, weight, bias)`` of a ``F.linear`` node with plain attribute operands, else None."""
    names = ("input", "weight", "bias")
    vals = dict(zip(names, base.args))
    vals.update(base.kwargs)
    if set(vals) - set(names) or not isinstance(vals.get("input"), fx.Node):
        return None
    w, b = vals.get("weight"), vals.get("bias")
    if not (isinstance(w, fx.Node) and w.op == "get_attr"):
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    return vals["input"], w, b


def _same_input(x: fx.Node, x_in) -> bool:
    """``x_in`` is ``x``, or both are the outputs of one recompute point (``x`` its first)."""
    if x_in is x:
        return True
    if not (isinstance(x_in, fx.Node) and x_in.op == "call_function" and x_in.target is operator.getitem
            and x.op == "call_function" and x.target is operator.getitem):
        return False
    point = x.args[0]
    return (point is x_in.args[0] and isinstance(point, fx.Node) and point.target is recompute_point
            and x.args[1] == 0 and x_in.args[1] == 1)


def _delta_parts(link: fx.Node):
    """``(x_in, A, B, s, remat)`` of a plain ``linear_delta`` link, else None."""
    names = ("y", "x", "lora_A", "lora_B", "scaling", "blocks", "remat")
    vals = dict(zip(names, link.args))
    vals.update(link.kwargs)
    if set(vals) - set(names) or vals.get("blocks") is not None:
        return None
    factors = [vals.get(k) for k in ("lora_A", "lora_B", "scaling")]
    if not all(isinstance(f, fx.Node) and f.op == "get_attr" for f in factors):
        return None
    return (vals.get("x"), *factors, vals.get("remat"))


def _only_reads_between(base: fx.Node, link: fx.Node) -> bool:
    n = base.next
    while n is not link:
        if n.op != "get_attr":
            return False
        n = n.next
    return True


def linear_site_graph(graph: fx.Graph, owner: Optional[nn.Module] = None) -> Optional[fx.Graph]:
    """A copy of ``graph`` with its linear sites as :func:`~lora_fx.linear_site.linear_site` calls
    (module docstring), or None when it has none.  ``owner``: the module the graph runs on (to
    read which ``call_module`` targets are ``nn.Linear``).  ``graph`` is not modified."""
    if not any(n.op == "call_function" and n.target is ops.linear_delta for n in graph.nodes):
        return None
    g = copy.deepcopy(graph)
    found = False
    for link in [n for n in g.nodes if n.op == "call_function" and n.target is ops.linear_delta]:
        base = link.args[0] if link.args else None
        parts = _delta_parts(link)
        if parts is None or not isinstance(base, fx.Node) or len(base.users) != 1:
            continue
        if base.op == "call_function" and base.target in _LINEAR:
            fn = _function_layer(base)
            if fn is None:
                continue
            x, w, b = fn
            layer_of = lambda: (w, b)  # noqa: E731
        elif base.op == "call_module" and len(base.args) == 1 and not base.kwargs and owner is not None:
            try:
                mod = owner.get_submodule(str(base.target))
            except AttributeError:
                continue
            if type(mod) is not nn.Linear:
                continue
            x = base.args[0]
            layer_of = lambda: g.get_attr(str(base.target))  # noqa: E731
        else:
            continue
        x_in, a, bb, s, remat = parts
        if not isinstance(x, fx.Node) or not _same_input(x, x_in) or not _only_reads_between(base, link):
            continue
        with g.inserting_before(link):
            layer = layer_of()
            kwargs = {} if remat is None else {"remat": remat}
            fused = g.call_function(linear_site, (layer, x, x_in, a, bb, s), kwargs)
        fused.meta = dict(link.meta)
        link.replace_all_uses_with(fused)
        g.erase_node(link)
        g.erase_node(base)
        found = True
    if not found:
        return None
    g.lint()
    return g


register_code_rewrite(linear_site_graph)
