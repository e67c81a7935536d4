"""Input guards of the export front-end: the sizes and values a captured graph is valid for.

``torch.export`` specialises the graph on what the forward's Python looked at: a branch on
``x.shape[1] > 4`` keeps one side and records ``x.shape[1] >= 5``; a size compared for equality,
a dimension of size 0 or 1 in the example (``Dim.AUTO``) or ``dynamic_shapes=False`` fixes the
size; a non-tensor argument (``n=3``) is baked in.  The exported program checks these on every
call ("Guard failed"); the ``GraphModule`` s rebuilt by :mod:`.trace_export` would not, and an
input outside them would silently run the branch taken at capture.

:func:`input_guards` reads them from the root graph's placeholders (their symbolic shapes) and the
program's range constraints into a spec of plain tuples, and :func:`guard_inputs_` inserts one
call of :func:`check_input_guards` after the placeholders, so the graph checks its own inputs
(also after ``copy.deepcopy``, pickling, ``fold`` and under ``torch.compile``, where the checks
become Dynamo guards).  In eager mode each new signature of input sizes and values is checked
once and remembered.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import fx

from lora_fx.errors import InputGuardError

__all__ = ["input_guards", "guard_inputs_", "check_input_guards"]

_SEEN: dict[tuple, set] = {}  # spec -> signatures checked already (eager calls)
_SEEN_MAX = 4096


def _dim(d) -> Any:
    """A size as the spec holds it: an int, or the sympy expression of a symbolic size as a string."""
    if isinstance(d, int):
        return int(d)
    expr = d.node.expr
    return int(expr) if expr.is_number else str(expr)


def _bound(v) -> Any:
    try:
        return int(v) if math.isfinite(float(v)) else None
    except (TypeError, ValueError, OverflowError):
        return None


def input_guards(graph: fx.Graph, range_constraints: Mapping) -> tuple:
    """The spec ``(inputs, ranges)`` of a captured graph: ``inputs`` holds, per placeholder,
    ``(name, "tensor", (size, ...))`` with each size an int or a symbol expression (``"s0"``,
    ``"2*s1"``), ``(name, "const", value)`` for a baked-in non-tensor argument, or
    ``(name, "any", None)``; ``ranges`` holds ``(symbol, lower, upper)`` (``None``: unbounded)."""
    inputs = []
    for n in graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            inputs.append((n.name, "tensor", tuple(_dim(d) for d in v.shape)))
        elif v is None or type(v) in (int, float, bool, str):
            inputs.append((n.name, "const", v))
        else:
            inputs.append((n.name, "any", None))
    ranges = tuple(sorted((str(sym), _bound(vr.lower), _bound(vr.upper)) for sym, vr in range_constraints.items()))
    return tuple(inputs), ranges


def guard_inputs_(gm: fx.GraphModule, spec: tuple) -> fx.GraphModule:
    """Insert ``check_input_guards(spec, *placeholders)`` after the placeholders of ``gm``'s graph
    (in place; returns ``gm``, not recompiled)."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = next((n for n in graph.nodes if n.op != "placeholder"), None)
    if anchor is None:
        return gm
    with graph.inserting_before(anchor):
        graph.call_function(check_input_guards, (spec, *placeholders))
    return gm


def _symbolic(inputs) -> bool:
    return torch.compiler.is_compiling() or any(
        isinstance(x, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in x.shape) for x in inputs)


def check_input_guards(spec: tuple, *inputs) -> None:
    """Raise unless ``inputs`` (the flat inputs of a captured graph) are within what the capture
    specialised on (:func:`input_guards`).  Eager calls check each new signature once.

    Raises:
        InputGuardError: naming the input, the size or value it got, and the range or value the
            graph was captured for.
    """
    if _symbolic(inputs):  # torch.compile / torch.export trace this: the checks become their guards
        _check(spec, inputs)
        return
    signature = tuple(tuple(x.shape) if isinstance(x, torch.Tensor) else
                      (type(x), x) if x is None or type(x) in (int, float, bool, str) else id(type(x)) for x in inputs)
    seen = _SEEN.get(spec)
    if seen is not None and signature in seen:
        return
    _check(spec, inputs)
    if seen is None:
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.clear()
        seen = _SEEN[spec] = set()
    if len(seen) >= _SEEN_MAX:
        seen.clear()
    seen.add(signature)


_FUNCTIONS = {"FloorDiv": lambda a, b: a // b, "CeilDiv": lambda a, b: -(-a // b), "Mod": lambda a, b: a % b,
              "PythonMod": lambda a, b: a % b, "Max": max, "Min": min, "floor": math.floor, "ceiling": math.ceil,
              "IntTrueDiv": lambda a, b: a / b, "TruncToInt": int, "__builtins__": {}}


def _how_to_fix() -> str:
    return ("The graph was captured (torch.export) for these sizes and values only: call it within them, or "
            "transform again with example inputs of this size (or dynamic_shapes=... allowing it; a size of 0 or 1 "
            "in the example, or dynamic_shapes=False, fixes the size).")


def _check(spec: tuple, inputs: tuple) -> None:
    entries, ranges = spec
    if len(inputs) != len(entries):
        raise InputGuardError(f"the captured graph takes {len(entries)} input(s) "
                              f"({', '.join(e[0] for e in entries)}), got {len(inputs)}. {_how_to_fix()}")
    bound: dict[str, int] = {}
    compound = []
    for (name, kind, want), x in zip(entries, inputs):
        if kind == "const":
            if type(x) is not type(want) or x != want:
                raise InputGuardError(f"input '{name}' is {x!r}, but the graph was captured with {name}={want!r} "
                                      f"(torch.export bakes non-tensor arguments in). {_how_to_fix()}")
            continue
        if kind != "tensor":
            continue
        if not isinstance(x, torch.Tensor) or x.dim() != len(want):
            got = f"a {x.dim()}-D tensor" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputGuardError(f"input '{name}' is {got}, but the graph was captured for a {len(want)}-D tensor. "
                                  f"{_how_to_fix()}")
        for i, (size, w) in enumerate(zip(x.shape, want)):
            if isinstance(w, int):
                if size != w:
                    raise InputGuardError(f"input '{name}' has {name}.shape[{i}] = {size}, but the graph was captured "
                                          f"for {name}.shape[{i}] == {w} (shape {tuple(x.shape)}). {_how_to_fix()}")
            elif w.isidentifier():
                if w in bound and bound[w][0] != size:
                    raise InputGuardError(
                        f"input '{name}' has {name}.shape[{i}] = {size}, but the graph was captured with it equal to "
                        f"{bound[w][1]} = {bound[w][0]}. {_how_to_fix()}")
                bound.setdefault(w, (size, f"{name}.shape[{i}]"))
            else:
                compound.append((name, i, size, w))
    for sym, lo, hi in ranges:
        if sym not in bound:
            continue
        size, where = bound[sym]
        if (lo is not None and size < lo) or (hi is not None and size > hi):
            shown = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            why = (" (a dynamic size excludes 0 and 1, which torch.export specialises)" if lo == 2 and size < 2 else
                   " (torch.export specialised the graph on this size: a branch or a check on it in the forward)")
            raise InputGuardError(f"input {where.split('.')[0]!r} has {where} = {size}, outside the range {shown} "
                                  f"the graph was captured for{why}. {_how_to_fix()}")
    if compound and not torch.compiler.is_compiling():
        values = {k: v for k, (v, _) in bound.items()}
        for name, i, size, expr in compound:
            try:
                want = eval(expr, dict(_FUNCTIONS), values)  # noqa: S307 (a sympy expression of sizes)
            except Exception:  # an expression of functions not listed: not checked
                continue
            if size != want:
                raise InputGuardError(f"input '{name}' has {name}.shape[{i}] = {size}, but the graph was captured "
                                      f"for {name}.shape[{i}] == {expr} = {want}. {_how_to_fix()}")
