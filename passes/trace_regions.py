"""Front-end: capture what torch.fx can and keep the rest as the model's own code.

The model stays the model: every module keeps its class (a ``LlamaForCausalLM`` stays one, with
its ``generate``, ``config`` and cache logic).  Modules are visited top-down (pre-order):

1. a module without an adaptable weight below it (:func:`lora_fx.weights.reason`) is left alone;
2. a module named by ``leaf_modules`` is kept as it is, children included;
3. a module whose ``forward`` has a *simple signature* (every argument positional and required,
   no ``*args`` / ``**kwargs``, not wrapped by its class, not an instance attribute) is traced by
   torch.fx into a **region**: a ``GraphModule`` over the module's own parameter, buffer and
   submodule tables, installed as the module's ``forward`` (:mod:`lora_fx.regions`).  Children of
   an ``nn.ModuleList``, modules named by ``blocks``, children whose forward branches on
   ``self.training`` and the innermost module of a failed trace are kept as opaque calls in that
   graph (the trace is retried) and visited on their own;
4. any other module (optional arguments, cache objects, shape tuples, value-dependent control
   flow) is **kept**: its own Python runs, its reason is recorded
   (:data:`lora_fx.state.KEPT_ATTR`), and its children are visited.

No example inputs, no first-call capture and no guards: a simple signature leaves nothing for a
trace to specialise on (every argument is a tensor the graph consumes), so the graph is the
module's code for every call.  Plain attributes (ints, floats, flags) a region reads are baked in
at capture, as for any torch.fx trace.  Structurally identical regions (the projections of every
layer) share one trace (``trace_fx._reuse_key``).
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Optional

from torch import fx, nn

from lora_fx import weights
from lora_fx.errors import TraceError
from lora_fx.graph_module import LoraGraphModule
from lora_fx.regions import install_region_
from lora_fx.state import CAPTURE_META, KEPT_ATTR

from .trace_fx import LoraTracer, _block_names, _copy_graph, _reuse_key, _trace

__all__ = ["capture_regions", "signature_reason", "CONTAINER"]

_TABLES = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
#: Why a container (``nn.ModuleList``, ``nn.ModuleDict``: no ``forward``) is kept.
CONTAINER = "a container without forward"


def signature_reason(module: nn.Module) -> Optional[str]:
    """None when ``module.forward`` has a simple signature (see the module docstring), else why not."""
    if "forward" in module.__dict__:
        return "its forward is an instance attribute"
    fwd = type(module).forward
    if fwd is nn.Module.forward:
        return CONTAINER
    try:
        params = list(inspect.signature(fwd).parameters.values())[1:]
    except (TypeError, ValueError):
        return "its forward has no signature"
    bad = [p.name for p in params if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
           or p.default is not p.empty]
    if bad:
        return f"forward has optional or variadic arguments ({', '.join(bad)})"
    if getattr(fwd, "__wrapped__", None) is not None:
        return "its class wraps forward (a decorator)"
    return None


def _has_weights(module: nn.Module) -> bool:
    return any(weights.reason(p) is None for p in module.parameters())


def _region_module(module: nn.Module, graph: fx.Graph, leaves: tuple[str, ...]) -> LoraGraphModule:
    """A ``LoraGraphModule`` over ``graph`` whose parameter, buffer and submodule tables are
    ``module``'s own dicts: passes read and register through it on the live module."""
    gm = LoraGraphModule(module, graph, class_name=type(module).__name__)
    d = gm.__dict__
    for name in _TABLES:
        d[name] = module.__dict__[name]
    own = set(module._parameters) | set(module._buffers) | set(module._modules)
    for node in graph.nodes:  # plain attributes the graph reads (tensor constants fx set on the module)
        if node.op == "get_attr":
            atom = str(node.target).split(".")[0]
            if atom not in own and atom in module.__dict__ and atom != "training":
                d[atom] = module.__dict__[atom]
    gm.training = bool(module.training)
    gm._tracer_cls = LoraTracer
    gm.meta[CAPTURE_META] = leaves
    return gm


def _outermost(names: set[str]) -> tuple[str, ...]:
    return tuple(sorted(n for n in names if not any(n.startswith(o + ".") for o in names if o != n)))


class _Capture:
    """One top-down pass over a private copy of the model (see the module docstring)."""

    def __init__(self, root: nn.Module, blocks: tuple[str, ...], leaf_modules: tuple[str, ...],
                 concrete_args: Optional[dict[str, Any]]):
        self.root, self.blocks, self.leaf_modules = root, blocks, leaf_modules
        self.concrete_args = concrete_args
        self.templates: dict[tuple, fx.Graph] = {}
        self.seen: set[int] = set()
        self.regions: list[str] = []

    def _is_leaf(self, path: str) -> bool:
        return any(fnmatch.fnmatchcase(path, p) for p in self.leaf_modules)

    def visit(self, module: nn.Module, path: str) -> None:
        if id(module) in self.seen or not _has_weights(module):
            return
        self.seen.add(id(module))
        if path and self._is_leaf(path):
            module.__dict__[KEPT_ATTR] = "named in leaf_modules"
            return
        reason = signature_reason(module)
        if reason is None:
            gm, leaves, reason = self._trace(module, path)
            if gm is not None:
                install_region_(module, gm)
                self.regions.append(path)
                for leaf in leaves:
                    self.visit(module.get_submodule(leaf), f"{path}.{leaf}" if path else leaf)
                return
        module.__dict__[KEPT_ATTR] = reason
        for name, child in module.named_children():
            self.visit(child, f"{path}.{name}" if path else name)

    def _trace(self, module: nn.Module, path: str):
        """``(region, leaves to visit, None)``, or ``(None, (), reason)`` when it cannot be traced."""
        prefix = f"{path}." if path else ""
        own_leaves = {n for n, _ in module.named_modules() if n and self._is_leaf(prefix + n)}
        visit = set(_block_names(module, prefix, self.blocks, (), self.leaf_modules))
        concrete = self.concrete_args if not path else None
        for _ in range(len(list(module.modules())) + 1):  # each retry adds a new leaf: it ends
            leaf_names = frozenset(visit | own_leaves)
            try:
                graph, auto = self._graph(module, prefix, leaf_names, concrete)
            except TraceError as exc:
                inner = getattr(exc, "module_path", None) or ""
                rel = inner[len(prefix):] if inner.startswith(prefix) else ""
                if not rel or rel in leaf_names:
                    return None, (), getattr(exc, "reason", None) or str(exc).strip().splitlines()[0]
                visit.add(rel)
                continue
            leaves = _outermost(visit | auto)
            return _region_module(module, graph, leaves), leaves, None
        return None, (), "torch.fx could not trace it"  # not reached: the loop adds a leaf or returns

    def _graph(self, module: nn.Module, prefix: str, leaf_names: frozenset, concrete) -> tuple[fx.Graph, set]:
        key = _reuse_key(module, "region", leaf_names) if concrete is None else None
        template = self.templates.get(key) if key is not None else None
        if template is not None:
            return _copy_graph(template), set()
        graph, auto = _trace(module, block_names=set(), leaf_names=set(leaf_names), leaf_types=(),
                             concrete_args=concrete, prefix=prefix)
        if key is not None and not auto and _reuse_key(module, *key[0]) == key:
            self.templates[key] = graph  # the trace left the module as it was: copies are exact
        return graph, auto


def capture_regions(root: nn.Module, *, blocks: tuple[str, ...] = (), leaf_modules: tuple[str, ...] = (),
                    concrete_args: Optional[dict[str, Any]] = None) -> list[str]:
    """Capture regions in ``root`` (a private copy the caller owns) in place; returns their module
    paths in visiting order (empty when nothing could be captured).  See the module docstring.

    Args:
        root: the module to capture; it and every module in it keep their class.
        blocks: patterns over fully qualified module names: kept as opaque calls of the region
            around them and captured on their own (children of ``nn.ModuleList`` s anyway).
        leaf_modules: patterns of modules kept as opaque calls (in a region: adapted by merging,
            through ``torch.func.functional_call``; outside one: left as they are).
        concrete_args: as ``torch.fx.symbolic_trace``'s, for ``root`` when it is a region.
    """
    capture = _Capture(root, tuple(blocks), tuple(leaf_modules), concrete_args)
    capture.visit(root, "")
    return capture.regions
