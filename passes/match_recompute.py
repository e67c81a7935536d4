"""Find how a factored site's adapter input can be recomputed in backward (see :mod:`lora_fx.recompute`).

:func:`remat_spec` maps the producer node of ``x`` to ``(kind, inputs, kwargs)`` with
``x == lora_fx.recompute.PRODUCERS[kind](*inputs, **kwargs)``; ``inputs`` are graph nodes (or None),
emitted as arguments of the delta node.  A leaf module producer is ``(kind, (u,), {"module": leaf})``
(a ``get_attr`` of the leaf), whose weights, attributes and hooks are read when the site runs.  Only exact, hook-free producers are matched: stock
``nn.LayerNorm``/``nn.RMSNorm``/``nn.GELU``/``nn.SiLU`` leaves, ``F.gelu``/``F.silu``/``F.layer_norm``/
``F.rms_norm`` calls, ``a * b`` of two nodes, gated activations (:func:`lora_fx.act_mul.act_mul`), and
the ATen forms (export front-end).

:func:`mark_recompute_points_` turns the producer node of every site that got a spec into a
:func:`lora_fx.recompute.recompute_point` (the compiled form of recomputation): the producer node
becomes ``point[0]`` in place, so it keeps its name and users, and the sites read ``point[1]``;
:func:`restore_recompute_points_` turns the producers no site needs any more back into the
original call.
"""

from __future__ import annotations

import operator
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import fx, nn

from lora_fx.act_mul import act_mul
from lora_fx.recompute import POINT_TARGETS, module_kind, recompute_point

__all__ = ["remat_spec", "mark_recompute_points_", "restore_recompute_points_"]

_aten = torch.ops.aten
_GELU = {F.gelu, torch._C._nn.gelu}
_SILU = {F.silu, torch._C._nn.silu}
_MUL = {operator.mul, torch.mul, _aten.mul.Tensor}


def _named_args(node: fx.Node, names: tuple[str, ...]) -> dict:
    """``node``'s arguments by parameter name (positional ones in ``names`` order, then keywords);
    works for a function and its ATen overload, whose extra trailing parameters are ignored."""
    vals = dict(zip(names, node.args))
    vals.update({k: v for k, v in node.kwargs.items() if k in names})
    return vals


def _norm_spec(kind: str, node: fx.Node, weights: tuple[str, ...], eps_default):
    vals = _named_args(node, ("input", "normalized_shape") + weights + ("eps",))
    shape = vals.get("normalized_shape")
    if not isinstance(shape, (list, tuple)) or any(isinstance(s, fx.Node) for s in shape):
        return None
    return kind, (vals["input"],) + tuple(vals.get(w) for w in weights), {
        "normalized_shape": tuple(shape), "eps": vals.get("eps", eps_default)} if "input" in vals else None


def _module_spec(graph: fx.Graph, gm: nn.Module, x: fx.Node):
    """A stock norm / activation leaf: ``(kind, (u,), {"module": <get_attr of the leaf>})``.  The
    leaf's weights and attributes (``eps``, ``approximate`` ...) are read when the site runs, and a
    leaf that has hooks then (or another type, after a swap) is not recomputed
    (:func:`lora_fx.recompute.down`): hooks or attributes changed after ``transform`` must not make the
    recomputed input differ from what the leaf returned."""
    m = gm.get_submodule(x.target)
    if (m._forward_hooks or m._forward_pre_hooks or len(x.args) != 1 or x.kwargs
            or not isinstance(x.args[0], fx.Node)):
        return None
    kind = module_kind(m)
    return None if kind is None else (kind, (x.args[0],), {"module": graph.get_attr(x.target)})


def _function_spec(x: fx.Node):
    t = x.target
    if t in _GELU or t is _aten.gelu.default:
        vals = _named_args(x, ("input", "approximate"))
        approximate = vals.get("approximate", "none")
        return ("gelu", (vals.get("input"),), {"approximate": approximate}) if isinstance(approximate, str) else None
    if t in _SILU or t is _aten.silu.default:
        vals = _named_args(x, ("input", "inplace"))
        return None if vals.get("inplace", False) else ("silu", (vals.get("input"),), {})
    if t in (F.layer_norm, _aten.layer_norm.default):
        return _norm_spec("layer_norm", x, ("weight", "bias"), 1e-5)
    if t is getattr(F, "rms_norm", None):
        return _norm_spec("rms_norm", x, ("weight",), None)
    if t in _MUL and len(x.args) == 2 and not x.kwargs and all(isinstance(a, fx.Node) for a in x.args):
        return "mul", tuple(x.args), {}
    if t is act_mul and len(x.args) == 2 and all(isinstance(a, fx.Node) for a in x.args):
        return "act_mul", tuple(x.args), dict(x.kwargs)
    return None


def remat_spec(graph: fx.Graph, gm: nn.Module, x) -> tuple | None:
    """``(kind, inputs, kwargs)`` recomputing node ``x``, or None.  For a leaf module producer it
    emits a ``get_attr`` of the leaf at the graph's current insertion point."""
    if not isinstance(x, fx.Node):
        return None
    point = _point_of(x)
    if point is not None:  # a producer marked before (or its adapters' input)
        x = _original(point)
    if x.op == "call_module":
        spec = _module_spec(graph, gm, x)
    elif x.op == "call_function":
        spec = _function_spec(x)
    else:
        return None
    if spec is None or not all(i is None or isinstance(i, fx.Node) for i in spec[1]) or spec[1][0] is None:
        return None
    if any(isinstance(v, fx.Node) for k, v in spec[2].items() if k != "module"):
        return None
    # an input written in place (``u.sin_()`` after ``gelu(u)``): backward would recompute x from
    # the new value; the site keeps x instead
    if any(i is not None and _written_in_place(i) for i in spec[1]):
        return None
    return spec


#: methods and functions that return a view of their first argument (writes through them reach it)
_VIEWS = frozenset({"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "expand", "expand_as",
                    "narrow", "unsqueeze", "squeeze", "t", "flatten", "unflatten", "select", "split", "chunk",
                    "unbind", "movedim", "swapaxes", "as_strided", "diagonal", "unfold", "detach", "contiguous",
                    "type_as", "to", "float", "real", "imag", "view_as_real", "view_as_complex"})
_INPLACE_FUNCTIONS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                                operator.ilshift, operator.irshift, operator.imatmul, operator.setitem})


def _op_name(n: fx.Node) -> str:
    if n.op == "call_method":
        return n.target
    return getattr(n.target, "__name__", "") if n.op == "call_function" else ""


def _written_in_place(node: fx.Node) -> bool:
    """Whether a graph op may write ``node``'s tensor in place, directly or through a view of it:
    an in-place method or function (``sin_``, ``+=``, ``x[i] = v``), ``inplace=True``, or a leaf
    module built with ``inplace=True``.  Conservative: any view-like use is followed."""
    seen, todo = set(), [node]
    owner = node.graph.owning_module
    while todo:
        n = todo.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            name = _op_name(u)
            first = u.args[0] if u.args else None
            if u.kwargs.get("inplace") is True or u.target in _INPLACE_FUNCTIONS and first is n:
                return True
            if name.endswith("_") and not name.endswith("__") and first is n:
                return True
            if u.op == "call_module" and owner is not None:
                mod = owner.get_submodule(u.target) if isinstance(u.target, str) else None
                if getattr(mod, "inplace", False) is True and first is n:
                    return True
            if (name in _VIEWS or u.target is operator.getitem) and first is n:
                todo.append(u)
    return False


#: call target -> its :data:`~lora_fx.recompute.POINT_TARGETS` name (the first name of an object
#: that has two, e.g. ``F.gelu is torch._C._nn.gelu``)
_POINT_NAME: dict = {}
for _name, (_, _fn) in POINT_TARGETS.items():
    _POINT_NAME.setdefault(_fn, _name)


def _is_point(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target is recompute_point


def _point_of(n):
    """The :func:`recompute_point` node whose output ``n`` is (``getitem(point, 0 or 1)``), or None."""
    if (isinstance(n, fx.Node) and n.op == "call_function" and n.target is operator.getitem
            and _is_point(n.args[0])):
        return n.args[0]
    return None


def _original(point: fx.Node):
    """What the :func:`recompute_point` node ``point`` stands for, as a node-like record
    (``op``, ``target``, ``args``, ``kwargs``) that :func:`remat_spec` and the restore read."""
    target, *args = point.args
    if isinstance(target, fx.Node):  # a leaf: recompute_point(<get_attr leaf>, u)
        return SimpleNamespace(op="call_module", target=target.target, args=tuple(args), kwargs=point.kwargs,
                               leaf=target)
    return SimpleNamespace(op="call_function", target=POINT_TARGETS[target][1], args=tuple(args),
                           kwargs=point.kwargs, leaf=None)


def _remat_sites(graph: fx.Graph, delta_ops) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in delta_ops and n.kwargs.get("remat")]


def _mark(graph: fx.Graph, x: fx.Node) -> fx.Node | None:
    """Rewrite producer ``x`` in place into ``getitem(point, 0)`` after a new ``point =
    recompute_point(...)`` node; returns ``point``, or None if ``x`` is no producer."""
    if x.op == "call_module":
        with graph.inserting_before(x):
            leaf = graph.create_node("get_attr", x.target)
            point = graph.call_function(recompute_point, (leaf,) + tuple(x.args), dict(x.kwargs))
    elif x.op == "call_function" and x.target in _POINT_NAME:
        with graph.inserting_before(x):
            point = graph.call_function(recompute_point, (_POINT_NAME[x.target],) + tuple(x.args), dict(x.kwargs))
    else:
        return None
    x.op, x.target, x.args, x.kwargs = "call_function", operator.getitem, (point, 0), {}
    return point


def mark_recompute_points_(gm: fx.GraphModule, delta_ops) -> int:
    """For every ``delta_ops`` node with a ``remat`` spec, turn the producer ``x = f(...)`` of its
    input into ``point = recompute_point("<f's name>", ...)`` (a leaf ``x = self.ln(u)``:
    ``recompute_point(<get_attr ln>, u)``) with ``x = point[0]``, in place (the node ``x`` keeps its
    name and users), and feed the site ``point[1]`` (one node per producer).  Producers marked
    before are reused.  Returns the number of producers rewritten (the caller recompiles)."""
    graph, done = gm.graph, 0
    for site in _remat_sites(graph, delta_ops):
        x = site.args[1]
        point = _point_of(x)
        if point is not None and x.args[1] == 1:
            continue  # marked before
        if point is None:
            point = _mark(graph, x) if isinstance(x, fx.Node) else None
            if point is None:
                continue
            done += 1
        x_in = next((u for u in point.users if u.target is operator.getitem and u.args[1] == 1), None)
        if x_in is None:
            with graph.inserting_after(x):
                x_in = graph.call_function(operator.getitem, (point, 1))
        site.args = (site.args[0], x_in) + tuple(site.args[2:])
    return done


def restore_recompute_points_(graph: fx.Graph, delta_ops) -> int:
    """Turn every :func:`recompute_point` that no ``delta_ops`` node with a ``remat`` spec reads any
    more back into the call it stood for, in place (the producer node ``point[0]`` becomes that
    call; ``point``, ``point[1]`` and a leaf's ``get_attr`` are erased).  Returns the number of
    producers restored."""
    needed = {_point_of(site.args[1]) for site in _remat_sites(graph, delta_ops)}
    done = 0
    for point in [n for n in graph.nodes if _is_point(n) and n not in needed]:
        orig = _original(point)
        users = sorted(point.users, key=lambda u: u.args[1])  # point[0] (the producer node) first
        x = users[0] if users and users[0].args[1] == 0 else None
        if x is not None:
            x.op, x.target, x.args, x.kwargs = orig.op, orig.target, orig.args, dict(orig.kwargs)
        for x_in in users[1 if x is not None else 0:]:
            if x is None:  # the producer's own value went unused: rebuild it where the input was read
                with graph.inserting_before(x_in):
                    x = graph.create_node(orig.op, orig.target, orig.args, dict(orig.kwargs))
            x_in.replace_all_uses_with(x)
            graph.erase_node(x_in)
        graph.erase_node(point)
        if orig.leaf is not None and not orig.leaf.users:
            graph.erase_node(orig.leaf)
        done += 1
    return done
