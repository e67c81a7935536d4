"""Find how a factored site's adapter input can be recomputed in backward (see :mod:`lora_fx.recompute`).

:func:`remat_spec` maps the producer node of ``x`` to ``(kind, inputs, kwargs)`` with
``x == lora_fx.recompute.PRODUCERS[kind](*inputs, **kwargs)``; ``inputs`` are graph nodes (or None),
emitted as arguments of the delta node.  A leaf module producer is ``(kind, (u,), {"module": leaf})``
(a ``get_attr`` of the leaf), whose weights, attributes and hooks are read when the site runs.  Only exact, hook-free producers are matched: stock
``nn.LayerNorm``/``nn.RMSNorm``/``nn.GELU``/``nn.SiLU`` leaves, ``F.gelu``/``F.silu``/``F.layer_norm``/
``F.rms_norm`` calls, ``a * b`` of two nodes, and their ATen forms (export front-end).
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from lora_fx.recompute import module_kind

__all__ = ["remat_spec"]

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
    return None


def remat_spec(graph: fx.Graph, gm: nn.Module, x) -> tuple | None:
    """``(kind, inputs, kwargs)`` recomputing node ``x``, or None.  For a leaf module producer it
    emits a ``get_attr`` of the leaf at the graph's current insertion point."""
    if not isinstance(x, fx.Node):
        return None
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
    return spec
