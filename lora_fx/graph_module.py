"""``LoraGraphModule``: a ``torch.fx.GraphModule`` that keeps its whole module structure through
``copy.deepcopy``, ``pickle`` and ``torch.save``.

A stock ``GraphModule`` rebuilds itself on copy and unpickle from the attributes its graph
references only, turning ``nn.ModuleList`` s into plain modules and dropping unreferenced
parameters, buffer persistence, hooks and extra attributes (the adapter records among them).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import enum
import threading
import types
from typing import Any, Callable, Iterator, Optional

import torch
from torch import fx
from torch.fx.graph_module import _deserialize_graph_module, _format_import_block, _forward_from_src
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.package import sys_importer

__all__ = ["LoraGraphModule", "deferred_recompile", "compile_stale", "value_key", "NotKeyable", "CODE_VERSION_ATTR",
           "register_code_rewrite"]

#: Key in a ``LoraGraphModule``'s ``__dict__``: its :attr:`~LoraGraphModule.code_version`.
CODE_VERSION_ATTR = "_lora_fx_code_version"

_GM_OWN = {"_graph", "_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec", "meta",
           "_tracer_cls", "_tracer_extras", "_replace_hooks", "_create_node_hooks", "_erase_node_hooks",
           "_deepcopy_hooks", "_graphmodule_cls_name"}


def _restore(gm: fx.GraphModule, state: dict[str, Any]) -> fx.GraphModule:
    for key, value in state.items():
        if key not in _GM_OWN:
            gm.__dict__[key] = value
    return gm


def _reduce_lora_graph_module(body: dict[str, Any], import_block: str) -> "LoraGraphModule":
    forward = _forward_from_src(import_block + body["_code"], {})
    gm = _deserialize_graph_module(forward, dict(body), graph_module_cls=LoraGraphModule)
    return _restore(gm, body)


_ATOMS = (type(None), type(Ellipsis), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
          torch.layout, torch.memory_format, enum.Enum)


_EXACT_ATOMS = frozenset({str, int, bool, type(None), torch.dtype, torch.device})
_EXACT_SEQUENCES = frozenset({tuple, list, torch.Size, immutable_list})
_EXACT_MAPPINGS = frozenset({dict, collections.OrderedDict, immutable_dict})
_BY_IDENTITY = frozenset({type, types.FunctionType, types.BuiltinFunctionType, types.MethodType})


class NotKeyable(Exception):
    """Raised by :func:`value_key` for a value that has no safe key (a tensor)."""


def value_key(v: Any) -> Any:
    """Hashable key of ``v`` such that equal keys mean interchangeable values for tracing and code
    generation: immutable atoms and (nested) tuples, lists, dicts and slices of them by type and
    value, ``fx.Node`` s by name, any other object by identity.

    Raises:
        NotKeyable: ``v`` is or holds a tensor (its values may matter)."""
    t = type(v)  # fast paths (exact types) first; the general checks follow
    if t in _EXACT_ATOMS:
        return (t, v)
    if t is fx.Node:
        return (fx.Node, v.name)
    if t in _EXACT_SEQUENCES:
        return (t, tuple([value_key(x) for x in v]))
    if t in _EXACT_MAPPINGS:
        return (t, tuple([(value_key(k), value_key(x)) for k, x in v.items()]))
    if t in _BY_IDENTITY:
        return ("id", id(v))
    if isinstance(v, (float, complex)):
        return (type(v), repr(v))  # -0.0 and 0.0 are equal but print differently
    if isinstance(v, _ATOMS):
        return (type(v), v)
    if isinstance(v, fx.Node):
        return (fx.Node, v.name)
    if isinstance(v, (tuple, list)):  # torch.Size, named tuples, fx's immutable_list: type is in the key
        return (type(v), tuple([value_key(x) for x in v]))
    if isinstance(v, dict):
        return (type(v), tuple([(value_key(k), value_key(x)) for k, x in v.items()]))
    if isinstance(v, slice):
        return (slice, value_key(v.start), value_key(v.stop), value_key(v.step))
    if isinstance(v, torch.Tensor):
        raise NotKeyable(type(v).__name__)
    return ("id", id(v))  # functions, classes, modules, shared objects: the very same object


def _code_key(graph: fx.Graph) -> Optional[tuple]:
    """Everything ``graph.python_code(root_module="self")`` reads: node ops, names, targets,
    arguments, types and metadata, the code generator and code-object fields; None when some part
    has no key (a tensor in the metadata, say)."""
    try:
        cg = graph._codegen
        return (type(cg), value_key(vars(cg)), value_key(getattr(graph, "_co_fields", {})),
                tuple((n.op, n.name, value_key(n.target), value_key(n.args), value_key(n.kwargs), value_key(n.type),
                       value_key(n.meta)) for n in graph.nodes))
    except NotKeyable:
        return None


def _profiler_metadata() -> bool:
    try:
        from torch.fx.experimental import _config
    except ImportError:  # older torch
        return False
    return bool(getattr(_config, "enrich_profiler_metadata", False))


#: ``fn(graph, module) -> graph' | None``: rewrites of the graph a module's *code* is generated from
#: (its ``graph`` stays as the passes built it), applied in order; None leaves the graph as it is.
_CODE_REWRITES: list[Callable[[fx.Graph, fx.GraphModule], Optional[fx.Graph]]] = []


def register_code_rewrite(fn: Callable[[fx.Graph, fx.GraphModule], Optional[fx.Graph]]):
    """Generate every ``LoraGraphModule``'s code from ``fn(graph, module)`` (a pure function
    returning a rewritten copy of ``graph``, or None) instead of its graph; returns ``fn``.  The
    rewrite must compute the same function: the graph, what every pass reads, is not changed, and
    pickles carry the graph's own code."""
    if fn not in _CODE_REWRITES:
        _CODE_REWRITES.append(fn)
    return fn


def _code_graph(gm: fx.GraphModule) -> Optional[fx.Graph]:
    """The graph ``gm``'s code is generated from, when a rewrite changes it (else None)."""
    graph, changed = gm._graph, False
    for fn in _CODE_REWRITES:
        new = fn(graph, gm)
        if new is not None:
            graph, changed = new, True
    return graph if changed else None


_local = threading.local()  # per thread: .active (a deferred block or its flush runs), .pending


@contextlib.contextmanager
def deferred_recompile() -> Iterator[None]:
    """Within the block, ``LoraGraphModule.recompile()`` (also the one ``GraphModule.__init__``
    runs) only marks the module stale; each stale module generates and compiles its code once, when
    the block ends, from its final graph (a pass that builds and then rewrites graphs pays one code
    generation per module, not one per step).  A stale module still works inside the block: calling
    it, reading ``.code`` or pickling it compiles it first.  Nested blocks join the outermost one."""
    if getattr(_local, "active", False):
        yield
        return
    pending: dict[int, LoraGraphModule] = {}
    _local.active, _local.pending = True, pending
    try:
        yield
    finally:
        _local.pending = None  # flushing: recompile() compiles again
        codes: Optional[dict] = None if _profiler_metadata() else {}  # equal graphs generate equal code
        try:
            for gm in pending.values():
                if gm._lora_fx_stale():
                    try:
                        gm._lora_fx_compile(codes)
                    except Exception:  # e.g. a graph a failed pass left half-built: it raises on use
                        pass
        finally:
            _local.active = False


def compile_stale(root) -> None:
    """Compile every stale ``LoraGraphModule`` in ``root`` now (before tracing through it or
    reading its ``forward`` signature inside a :func:`deferred_recompile` block)."""
    for m in root.modules():
        if isinstance(m, LoraGraphModule) and m._lora_fx_stale():
            m._lora_fx_compile()


def _lazy_forward(self, *args, **kwargs):
    self._lora_fx_compile()
    return self(*args, **kwargs)


class LoraGraphModule(fx.GraphModule):
    """A ``GraphModule`` whose copies and pickles are the same module (children, parameters,
    buffers and their persistence, hooks, training flag and every extra attribute)."""

    def recompile(self) -> Optional[Any]:
        """``GraphModule.recompile``; inside :func:`deferred_recompile` it only marks the module
        stale and returns None (the code is generated when the block ends, or on first use).
        Either way :attr:`code_version` moves on."""
        self.__dict__[CODE_VERSION_ATTR] = self.code_version + 1
        pending = getattr(_local, "pending", None)
        if pending is None:
            return self._lora_fx_compile()
        pending[id(self)] = self
        type(self).forward = _lazy_forward  # each GraphModule instance has its own class
        return None

    @property
    def code_version(self) -> int:
        """A counter bumped by every :meth:`recompile`: code cached from this module (a region's
        ``forward``, a variant built from its graph) is current while the counter is unchanged."""
        return self.__dict__.get(CODE_VERSION_ATTR, 0)

    def _lora_fx_stale(self) -> bool:
        return type(self).forward is _lazy_forward

    def _lora_fx_compile(self, codes: Optional[dict] = None):
        """Generate and compile the code now; returns the ``PythonCode``.  With ``codes``, a graph
        equal (:func:`_code_key`) to one compiled before reuses its generated source (the layers of
        a model, typically), which is then only compiled."""
        rewritten = _code_graph(self)
        key = None if codes is None else _code_key(self._graph if rewritten is None else rewritten)
        code = None if key is None else codes.get(key)
        if code is None:
            code = self._generate(rewritten)
            if key is not None:
                codes[key] = code
            return code
        graph = self._graph
        graph.python_code = lambda *args, **kwargs: code  # what code generation would give again
        try:
            return fx.GraphModule.recompile(self)
        finally:
            del graph.python_code

    def _generate(self, rewritten: Optional[fx.Graph]):
        """``GraphModule.recompile`` on the graph ``rewritten`` (when given) instead of ``self.graph``."""
        if rewritten is None:
            return fx.GraphModule.recompile(self)
        graph = self._graph
        self._graph = rewritten  # the attribute, not the property (whose setter recompiles)
        try:
            return fx.GraphModule.recompile(self)
        finally:
            self._graph = graph

    def _recompile_submodules(self):
        # GraphModule.recompile recompiles every child GraphModule; while deferring, a lora_fx child
        # that is not stale keeps its (current) code, and a stale one is compiled once, on its own
        if not getattr(_local, "active", False):
            return super()._recompile_submodules()
        return [(name, mod.recompile()) for name, mod in self.named_children()
                if isinstance(mod, fx.GraphModule) and not (isinstance(mod, LoraGraphModule) and not mod._lora_fx_stale())]

    @property
    def code(self) -> str:
        if self._lora_fx_stale():
            self._lora_fx_compile()
        return super().code

    def __str__(self) -> str:
        if self._lora_fx_stale():
            self._lora_fx_compile()
        return super().__str__()

    def __deepcopy__(self, memo: dict[int, Any]) -> "LoraGraphModule":
        res = super().__deepcopy__(memo)
        type(res).__name__ = type(self).__name__  # the captured module's class name (each instance has its own class)
        return _restore(res, {k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k not in _GM_OWN})

    def __reduce__(self):
        if self._lora_fx_stale():
            self._lora_fx_compile()
        python_code = self._graph.python_code(root_module="self")  # the graph's own code (no rewrite)
        body = self.__dict__.copy()
        body["_code"] = python_code.src
        body["_graphmodule_cls_name"] = type(self).__name__  # restored by _deserialize_graph_module
        import_block = _format_import_block(python_code.globals, sys_importer)
        del body["_graph"]
        return (_reduce_lora_graph_module, (body, import_block))
