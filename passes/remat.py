"""Find how a factored site's adapter input can be recomputed in backward (see :mod:`lora_fx.remat`).

:func:`remat_spec` maps the producer node of ``x`` to ``(kind, inputs, kwargs)`` with
``x == lora_fx.remat.PRODUCERS[kind](*inputs, **kwargs)``; ``inputs`` are graph nodes (or None),
emitted as arguments of the delta node.  Only exact, hook-free producers are matched: stock
``nn.LayerNorm``/``nn.RMSNorm``/``nn.GELU``/``nn.SiLU`` leaves, ``F.gelu``/``F.silu``/``F.layer_norm``/
``F.rms_norm`` calls, ``a * b`` of two nodes, and their ATen forms (export front-end).
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["remat_spec"]

_aten = torch.ops.aten
_GELU = {F.gelu, torch._C._nn.gelu}
_SILU = {F.silu, torch._C._nn.silu}
_MUL = {operator.mul, torch.mul, _aten.mul.Tensor}


def _bind(fn, node: fx.Node):
    try:
        return inspect.signature(fn).bind(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):
        return None


def _module_spec(graph: fx.Graph, gm: nn.Module, x: fx.Node):
    m = gm.get_submodule(x.target)
    if (m._forward_hooks or m._forward_pre_hooks or len(x.args) != 1 or x.kwargs
            or not isinstance(x.args[0], fx.Node)):
        return None
    u, t = x.args[0], type(m)

    def attr(name):
        return graph.get_attr(f"{x.target}.{name}") if getattr(m, name, None) is not None else None

    if t is nn.GELU:
        return "gelu", (u,), {"approximate": m.approximate}
    if t is nn.SiLU and not m.inplace:
        return "silu", (u,), {}
    if t is nn.LayerNorm:
        return "layer_norm", (u, attr("weight"), attr("bias")), {"normalized_shape": tuple(m.normalized_shape),
                                                                 "eps": m.eps}
    if t is getattr(nn, "RMSNorm", None):
        return "rms_norm", (u, attr("weight")), {"normalized_shape": tuple(m.normalized_shape), "eps": m.eps}
    return None


def _function_spec(x: fx.Node):
    t = x.target
    if t in _GELU or t is _aten.gelu.default:
        approximate = x.kwargs.get("approximate", x.args[1] if len(x.args) > 1 else "none")
        return ("gelu", (x.args[0],), {"approximate": approximate}) if isinstance(approximate, str) else None
    if t in _SILU or t is _aten.silu.default:
        inplace = x.kwargs.get("inplace", x.args[1] if len(x.args) > 1 else False)
        return None if inplace else ("silu", (x.args[0],), {})
    if t in (F.layer_norm, _aten.layer_norm.default):
        names = ("input", "normalized_shape", "weight", "bias", "eps")
        vals = dict(zip(names, x.args))
        vals.update({k: v for k, v in x.kwargs.items() if k in names})
        shape = vals.get("normalized_shape")
        if not isinstance(shape, (list, tuple)) or any(isinstance(s, fx.Node) for s in shape):
            return None
        return "layer_norm", (vals["input"], vals.get("weight"), vals.get("bias")), {
            "normalized_shape": tuple(shape), "eps": vals.get("eps", 1e-5)}
    if t is getattr(F, "rms_norm", None):
        vals = _bind(F.rms_norm, x)
        if vals is None or not isinstance(vals.get("normalized_shape"), (list, tuple)):
            return None
        return "rms_norm", (vals["input"], vals.get("weight")), {
            "normalized_shape": tuple(vals["normalized_shape"]), "eps": vals.get("eps")}
    if t in _MUL and len(x.args) == 2 and not x.kwargs and all(isinstance(a, fx.Node) for a in x.args):
        return "mul", tuple(x.args), {}
    return None


def remat_spec(graph: fx.Graph, gm: nn.Module, x) -> tuple | None:
    """``(kind, inputs, kwargs)`` recomputing node ``x``, or None.  Emits ``get_attr`` nodes for
    a leaf module's weights at the graph's current insertion point."""
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
    if any(isinstance(v, fx.Node) for v in spec[2].values()):
        return None
    return spec
