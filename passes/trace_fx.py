"""Front-end: torch.fx symbolic tracing that keeps the module hierarchy users hook into.

Repeated blocks (children of an ``nn.ModuleList``, or modules named by ``blocks`` patterns) are
traced as leaves of their parent and then each traced into its own ``GraphModule`` that replaces
the block in place, so the parent still *calls* the block: per-block FSDP2 ``fully_shard``,
activation checkpointing and regional ``torch.compile`` keep working (a flat trace inlines block
forwards and their hooks never fire).

A block built exactly like one traced before (same classes, submodule/parameter layout, plain
attributes, constant arguments, no forward hooks inside: see ``_reuse_key``) is not traced again:
it gets a copy of that graph, which names everything relative to the block, so it runs on the
block's own weights.  The model's blocks typically cost one trace in all.

Writes to module state (:mod:`.state_writes`): torch.fx hands a forward its buffers as real
tensors, so an in-place write such as ``self.steps.add_(1)`` would run once at trace time and leave
no node.  Each trace watches the buffers' and tensor attributes' version counters and puts their
values back afterwards; when one moved, it traces again with those tensors as graph values
(``get_attr`` nodes), so the writes become graph ops on the module's own buffers.  Assignments
whose previous value the graph reads (``self.count = self.count + 1``) cannot be kept: they raise
:class:`~lora_fx.errors.TraceError`.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import math
import os
import warnings
from typing import Any, Iterable, Optional

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _assert_is_none as _fx_assert_is_none

from lora_fx.errors import InputGuardError, LoraFxWarning, TraceError, user_frame
from lora_fx.graph_module import LoraGraphModule, NotKeyable, compile_stale, value_key
from lora_fx.ops import LORA_OPS
from lora_fx.rules import module_rule
from lora_fx.state import LEAF_ATTR, graph_modules

from .guards import check_input_guards
from .state_writes import (StateProxy, as_buffers_, assignment_error, check_assignments, graph_writes, prefixed,
                           record_state_writes, restore_state_, snapshot_state, written_attr)

__all__ = ["LoraTracer", "assert_is_none", "trace_hierarchy", "build_graph_module", "graph_modules"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def assert_is_none(value: Any, msg: str) -> None:
    """Guard of an argument traced as the constant ``None`` (replaces fx's own
    ``torch.fx._symbolic_trace._assert_is_none``, whose generated ``wrap("torch.fx....")`` line
    breaks every later trace in the process once such a module is unpickled).

    Raises:
        InputGuardError: ``value`` is not None (``msg`` names the argument; an ``AssertionError``
            as fx's own guard).
    """
    if value is not None:
        raise InputGuardError(f"{msg}: the graph was traced with it fixed to None (concrete_args, or a constant "
                              "every call site passed). Call it without that argument, or transform again without "
                              "fixing it (then the graph takes it as an input).")


class _TrainingFlag(int):
    """Stand-in for ``module.training`` while tracing: passed to an op it becomes a runtime read
    of the module's mode (a ``get_attr`` node); used in Python control flow (``if self.training``)
    it is recorded, so the module can be kept as a leaf that follows ``train()``/``eval()``."""

    def __new__(cls, value: bool, path: str, seen: set):
        obj = super().__new__(cls, bool(value))
        obj.path, obj.seen = path, seen
        return obj

    def __bool__(self) -> bool:
        self.seen.add(self.path)
        return int(self) != 0

    def __repr__(self) -> str:
        return repr(bool(int(self)))


class LoraTracer(fx.Tracer):
    """``torch.fx.Tracer`` that treats lora_fx ops as leaves (so a pickled adapted module
    re-traces to the same graph), extra leaf modules by name or type, and tracks the module being
    traced for error messages."""

    def __init__(self, autowrap_modules=(math,), autowrap_functions=(), param_shapes_constant=False, *,
                 leaf_names: Iterable[str] = (), leaf_types: tuple[type, ...] = (), state: Iterable[str] = ()):
        super().__init__(autowrap_modules=autowrap_modules,
                         autowrap_functions=tuple(autowrap_functions) + tuple(LORA_OPS) + (assert_is_none,
                                                                                           check_input_guards),
                         param_shapes_constant=param_shapes_constant)
        self.leaf_names = frozenset(leaf_names)
        self.leaf_types = tuple(leaf_types)
        self.state = frozenset(state)  # buffers handed to the forward as graph values (written in place)
        self._state_ids: dict[int, str] = {}
        self._lora_scope: list[str] = []

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict):
        """fx's attribute access, and a ``get_attr`` proxy for the buffers named in ``state``."""
        name = self._state_ids.get(id(attr_val)) if isinstance(attr_val, torch.Tensor) else None
        if name is None:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {},
                                                            proxy_factory_fn=lambda node: StateProxy(node, self))
        return parameter_proxy_cache[name]

    def aliased_state(self, value: Any) -> Any:
        """The module tensor a traced value is (its in-place ops' target), or None: lets
        ``self.buf += x`` (an in-place write, then a rebinding to the same object) stand."""
        node = written_attr(value.node) if isinstance(value, fx.Proxy) else None
        if node is None:
            return None
        owner, _, name = str(node.target).rpartition(".")
        try:
            mod = self.root.get_submodule(owner) if owner else self.root
        except AttributeError:
            return None
        return mod._buffers.get(name) if name in mod._buffers else vars(mod).get(name)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if getattr(type(m), LEAF_ATTR, False) or module_rule(m).leaf:  # lora_fx.nn layers, bitsandbytes linears
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def trace(self, root, concrete_args=None):
        """``fx.Tracer.trace`` with every module's ``training`` flag replaced by a recording stand-in
        (restored afterwards); module paths whose forward branched on it land in ``self.branched``."""
        self.branched: set[str] = set()
        if not isinstance(root, nn.Module):
            return super().trace(root, concrete_args)
        own_graph = module_rule(root).own_graph  # a module whose rule gives its forward as a graph
        if own_graph is not None:
            self.root = root
            return own_graph(root)
        compile_stale(root)  # a GraphModule built or copied in a deferred_recompile block: fx traces its forward
        self._state_ids = {id(root.get_buffer(n)): n for n in self.state}
        saved = [(m, m.training) for m in root.modules()]
        for name, m in root.named_modules():
            object.__setattr__(m, "training", _TrainingFlag(m.training, name, self.branched))
        try:
            return super().trace(root, concrete_args)
        finally:
            for m, mode in saved:
                object.__setattr__(m, "training", mode)

    def create_arg(self, a: Any):
        if isinstance(a, _TrainingFlag):  # ``F.dropout(x, p, self.training)``: read the mode at run time
            return self.create_node("get_attr", f"{a.path}.training" if a.path else "training", (), {})
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        self._lora_scope.append(self.path_of_module(m) if m is not self.root else "")
        result = super().call_module(m, forward, args, kwargs)
        self._lora_scope.pop()
        return result


def _trace_error(exc: Exception, module_path: str, module: nn.Module) -> TraceError:
    """The error for a failed trace of ``module`` (at ``module_path``; ``""``: the root), with fixes
    that work for it: a child can be kept as an opaque leaf, the root cannot (a leaf root is not
    traced at all, so it would fail the same way)."""
    frame = user_frame(exc, also_skip=(_HERE,))
    where = f" at {frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else ""
    name = module_path or "<root>"
    export = ("use the torch.export front-end: transform(model, ..., frontend='export', example_inputs=(x,)), which "
              "specialises Python control flow on shapes and arguments to the example inputs (not on tensor values)")
    if module_path:
        fixes = (f"(1) pass concrete_args={{'arg': value}} for arguments the code branches on; (2) mark the module as "
                 f"an opaque leaf with leaf_modules=['{name}'] (its own weights are then adapted by merging, through "
                 f"torch.func.functional_call, when named in targets); or (3) {export}")
    else:
        fixes = (f"(1) pass concrete_args={{'arg': value}} for arguments of forward the code branches on; (2) "
                 "frontend='regions', which keeps the root's own Python and captures its submodules; (3) "
                 f"{export}; or (4) move the failing lines into a submodule and keep that submodule opaque with "
                 "leaf_modules=['<its name>']")
    err = TraceError(
        f"torch.fx could not trace module '{name}' ({type(module).__name__}){where}: "
        f"{type(exc).__name__}: {exc}\n"
        f"How to fix: {fixes}.")
    # capture's combined advice and the regions front-end: the innermost module and a one-line reason
    err.module_path = module_path
    first = (str(exc).strip().splitlines() or [""])[0]
    at = f"{os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`: " if frame else ""
    err.reason = f"{at}{type(exc).__name__}: {first}"
    return err


_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
               "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")


def build_graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """``GraphModule`` over ``graph`` that keeps ``module``'s children (containers such as
    ``nn.ModuleList`` stay what they were), its parameters and buffers under the same names, and
    its buffers' persistence, so ``state_dict`` keys equal ``module.state_dict()``'s."""
    gm = LoraGraphModule(module, graph, class_name=type(module).__name__)
    gm._modules.clear()
    for name, child in module.named_children():
        gm._modules[name] = child
    persistent = {n for n in module._buffers if n not in module._non_persistent_buffers_set}
    for name in list(gm._buffers):
        if name not in persistent:  # traced tensor constants and plain tensor attributes
            gm._non_persistent_buffers_set.add(name)
    for name, p in module._parameters.items():
        if name not in gm._parameters and p is not None:
            gm.register_parameter(name, p)
    for name in persistent:
        if name not in gm._buffers and module._buffers[name] is not None:
            gm.register_buffer(name, module._buffers[name])
    # the module's order (GraphModule adds attributes in graph order), so state_dict keys keep it
    for table, own in ((gm._parameters, module._parameters), (gm._buffers, module._buffers)):
        order = [k for k in own if k in table] + [k for k in table if k not in own]
        items = [(k, table[k]) for k in order]
        table.clear()
        table.update(items)
    gm.training = bool(module.training)  # its own flag only: children keep theirs (a block in eval mode stays so)
    for name in _HOOK_DICTS:  # the user's hooks on the traced module keep firing on its GraphModule
        if getattr(module, name, None):
            setattr(gm, name, getattr(module, name))
    gm._tracer_cls = LoraTracer
    return gm


def _block_names(module: nn.Module, prefix: str, patterns: tuple[str, ...], leaf_types,
                 leaf_patterns: tuple[str, ...] = ()) -> set[str]:
    """Relative names of the outermost block modules under ``module`` (a module named by
    ``leaf_patterns`` is a leaf, never a block)."""
    tracer = fx.Tracer()
    found = set()
    inside: set[str] = set()  # found blocks and every module below them (preorder: parents come first)
    by_name: dict[str, nn.Module] = {}
    for name, child in module.named_modules():
        by_name[name] = child
        if not name:
            continue
        parent_name = name.rpartition(".")[0]
        if parent_name in inside:
            inside.add(name)
            continue
        parent = by_name[parent_name]
        is_block = isinstance(parent, nn.ModuleList) or any(fnmatch.fnmatchcase(prefix + name, p) for p in patterns)
        is_leaf = any(fnmatch.fnmatchcase(prefix + name, p) for p in leaf_patterns)
        if (is_block and not is_leaf and not tracer.is_leaf_module(child, name) and not isinstance(child, leaf_types)
                and not module_rule(child).leaf):
            found.add(name)
            inside.add(name)
    return found


def _concrete_args_from_calls(block: nn.Module, calls: list[fx.Node]) -> dict[str, Any]:
    """Arguments every call site passes the same constant for (e.g. ``mask=None``), so tracing the
    block specialises on them instead of branching on a proxy."""
    try:
        sig = inspect.signature(block.forward)
    except (TypeError, ValueError):
        return {}
    common: Optional[dict[str, Any]] = None
    for node in calls:
        try:
            bound = sig.bind(*node.args, **node.kwargs)
        except TypeError:
            return {}
        consts = {}
        for k, prm in sig.parameters.items():
            if prm.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                continue
            v = bound.arguments[k] if k in bound.arguments else prm.default
            if v is not inspect.Parameter.empty and (v is None or isinstance(v, (bool, int, float, str))):
                consts[k] = v
        common = consts if common is None else {k: v for k, v in common.items() if k in consts and consts[k] == v}
    return common or {}


def _tidy_concrete_args(graph: fx.Graph, concrete_args: Optional[dict[str, Any]]) -> None:
    """Two fixes to fx's handling of concrete arguments: fx names the placeholder of ``mask``
    ``mask_1``, so the traced forward no longer accepts ``mask=...`` by keyword (give it back its
    name; the value is still asserted), and its ``None`` guard is replaced by
    :func:`assert_is_none` (pickle-safe)."""
    if not concrete_args:
        return
    for n in graph.nodes:
        if n.op == "call_function" and n.target is _fx_assert_is_none:
            n.target = assert_is_none
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    taken = {n.target for n in placeholders}
    for n in placeholders:
        name = n.target[:-2] if isinstance(n.target, str) and n.target.endswith("_1") else None
        if name in concrete_args and name not in taken and (
                concrete_args[name] is None or isinstance(concrete_args[name], (bool, int, float, str))):
            n.target = name
            taken.add(name)


def _warn_optional_inputs(graph: fx.Graph, module: nn.Module) -> None:
    """Warn about root arguments that default to None but were traced as tensors: fx follows the
    ``x is not None`` branch, so calling without them fails at run time."""
    used = [n.target for n in graph.nodes if n.op == "placeholder" and n.args == (None,) and n.users
            and not n.target.startswith("*")]
    if used:
        warnings.warn(
            f"{type(module).__name__}.forward arguments {used} default to None but the traced graph uses them as "
            "inputs (torch.fx follows the 'is not None' branch): calling the result without them will fail. If you "
            f"never pass them, transform(..., concrete_args={{{', '.join(repr(u) + ': None' for u in used)}}}); "
            "otherwise always pass them, or use frontend='export' with example inputs.", LoraFxWarning, stacklevel=4)


# ------------------------------------------------------------------------------------------------
# reuse of one traced graph for structurally identical blocks

_FORWARD_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
_MODULE_OWN = frozenset(_HOOK_DICTS) | {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                                        "_is_full_backward_hook", "training"}
_GLOBAL_FORWARD_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_always_called",
                         "_global_forward_hooks_with_kwargs")


def _reuse_key(module: nn.Module, *extra: Any) -> Optional[tuple]:
    """Key under which ``module``'s traced graph can be reused for another module, or None.

    Two modules with equal keys are traced to the same graph by a deterministic forward: same
    classes (so the same ``forward`` code) throughout, no instance-level ``forward``, no forward
    hooks below the root (fx runs them while tracing), the same submodule, parameter and buffer
    layout (names, ties, shapes, dtypes, devices) and equal plain attributes (``training``,
    sizes, flags ...); a plain tensor attribute or a global forward hook rules reuse out.  The
    graph names parameters and submodules relative to the root, so a copy of it run on the other
    module reads that module's own weights."""
    if any(getattr(torch.nn.modules.module, h, None) for h in _GLOBAL_FORWARD_HOOKS):
        return None
    seen: dict[int, int] = {}

    def ref(obj) -> int:
        return seen.setdefault(id(obj), len(seen))

    key: list = [extra]
    try:
        for name, m in module.named_modules(remove_duplicate=False):
            d = m.__dict__
            if "forward" in d or (name and any(d.get(h) for h in _FORWARD_HOOKS)):
                return None
            key.append((name, type(m), ref(m), bool(m.training), frozenset(m._non_persistent_buffers_set),
                        tuple((k, None if c is None else ref(c)) for k, c in m._modules.items()),
                        tuple((k, None if t is None else (ref(t), type(t), tuple(t.shape), t.dtype, t.device,
                                                          t.requires_grad))
                              for table in (m._parameters, m._buffers) for k, t in table.items()),
                        tuple((k, value_key(v)) for k, v in d.items() if k not in _MODULE_OWN)))
    except NotKeyable:  # a plain tensor attribute: its values may steer the trace
        return None
    return tuple(key)


def _copy_graph(template: fx.Graph) -> fx.Graph:
    """A fresh copy of ``template`` (same node names, targets and metadata)."""
    g = fx.Graph(tracer_cls=template._tracer_cls, tracer_extras=copy.copy(template._tracer_extras))
    g._co_fields = dict(getattr(template, "_co_fields", {}))
    g._codegen = copy.deepcopy(template._codegen)
    val_map: dict[fx.Node, fx.Node] = {}
    for node in template.nodes:
        new = val_map[node] = g.node_copy(node, val_map.__getitem__)
        if "nn_module_stack" in new.meta:
            new.meta["nn_module_stack"] = copy.copy(new.meta["nn_module_stack"])
    return g


def trace_hierarchy(
    module: nn.Module,
    *,
    blocks: tuple[str, ...] = (),
    leaf_modules: tuple[str, ...] = (),
    leaf_types: tuple[type, ...] = (),
    concrete_args: Optional[dict[str, Any]] = None,
    prefix: str = "",
    memo: Optional[dict[int, fx.GraphModule]] = None,
    templates: Optional[dict[tuple, fx.Graph]] = None,
) -> fx.GraphModule:
    """Trace ``module`` (which the caller owns: blocks inside it are replaced in place) into a
    ``GraphModule`` whose blocks are themselves traced ``GraphModule`` s.

    Args:
        module: the module to trace (a private copy of the user's model).
        blocks: fnmatch patterns over fully qualified module names of extra blocks; children of
            every ``nn.ModuleList`` are blocks anyway.
        leaf_modules: patterns of modules to keep opaque (called, not traced through).
        leaf_types: module types to keep opaque.
        concrete_args: as ``torch.fx.symbolic_trace``'s, for the root only.

    Raises:
        TraceError: naming the module, the source line and the escape hatches; or naming the
            module state a forward assigns.
    """
    memo = {} if memo is None else memo
    templates = {} if templates is None else templates
    block_names = _block_names(module, prefix, blocks, leaf_types, leaf_modules)
    leaf_names = {name for name, _ in module.named_modules()
                  if name and any(fnmatch.fnmatchcase(prefix + name, p) for p in leaf_modules)}
    # a block built like one traced before (the layers of a ModuleList, typically) reuses its graph
    key = None
    if prefix:
        try:
            constants = tuple(sorted((k, value_key(v)) for k, v in (concrete_args or {}).items()))
        except NotKeyable:
            constants = None
        if constants is not None:
            key = _reuse_key(module, frozenset(block_names), frozenset(leaf_names), leaf_types, constants)
    template = templates.get(key) if key is not None else None
    if template is not None:
        graph = _copy_graph(template)
    else:
        graph, auto_leaves = _trace(module, block_names=block_names, leaf_names=leaf_names, leaf_types=leaf_types,
                                    concrete_args=concrete_args, prefix=prefix)
        weighty = sorted(prefix + n for n in auto_leaves
                         if any(True for _ in module.get_submodule(n).parameters()))
        if weighty:
            warnings.warn(f"{weighty} branch on self.training in forward; lora_fx keeps them as opaque leaves so "
                          "train()/eval() still switch them (their own weights are adapted only when named in "
                          "targets, by merging).", LoraFxWarning, stacklevel=3)
        _tidy_concrete_args(graph, concrete_args)
        if not prefix:
            _warn_optional_inputs(graph, module)
        if key is not None and not auto_leaves and _reuse_key(module, *key[0]) == key:
            templates[key] = graph  # the trace left the module as it was: copies of its graph are exact
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in block_names:
            calls.setdefault(node.target, []).append(node)
    for target, nodes in calls.items():
        block = module.get_submodule(target)
        if id(block) not in memo:
            memo[id(block)] = trace_hierarchy(
                block, blocks=blocks, leaf_modules=leaf_modules, leaf_types=leaf_types,
                concrete_args=_concrete_args_from_calls(block, nodes) or None,
                prefix=f"{prefix}{target}.", memo=memo, templates=templates)
        parent_name, _, child_name = target.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        parent._modules[child_name] = memo[id(block)]
    return build_graph_module(module, graph)


def _trace(module: nn.Module, *, block_names: set[str], leaf_names: set[str], leaf_types: tuple[type, ...],
           concrete_args: Optional[dict[str, Any]], prefix: str) -> tuple[fx.Graph, set[str]]:
    """Trace ``module`` with blocks and leaves opaque; modules whose forward branches on
    ``self.training`` become leaves too (returned as the second item).

    Module state the forward writes (:mod:`.state_writes`): every trace runs on a snapshot of the
    buffers and tensor attributes it can reach, put back afterwards; a write that ran at trace time
    (in place with no traced argument, an assignment of a value computed once, or a tensor that
    graph ops write but the forward also read eagerly) makes it trace again with those tensors as
    graph values, so the writes and the reads around them become graph ops on the module's own
    state.  An assignment whose previous value the graph reads raises a :class:`TraceError`."""
    auto_leaves: set[str] = set()
    state: set[str] = set()  # buffers handed to the forward as graph values
    for _ in range(len(list(module.modules())) + 8):  # each round adds a leaf or a state tensor: it ends
        tracer = LoraTracer(leaf_names=block_names | leaf_names, leaf_types=leaf_types, state=state)
        snap = snapshot_state(module, skip=block_names | leaf_names)
        try:
            with record_state_writes(module, alias=tracer.aliased_state,
                                     traced=lambda v: isinstance(v, fx.Proxy)) as writes:
                graph = tracer.trace(module, concrete_args=concrete_args)
        except Exception as exc:  # fx raises many types; report one, with where and how to fix
            restore_state_(snap)
            if writes:  # e.g. a Proxy assigned to a buffer: torch refuses it
                raise assignment_error([prefixed(w, prefix) for w in writes], "fx", module) from exc
            retry = tracer.branched - leaf_names - block_names - {""}
            if retry:  # the failure came after a branch on self.training: keep those modules opaque, retry
                leaf_names, auto_leaves = leaf_names | retry, auto_leaves | retry
                continue
            inner = ".".join(p for p in [prefix.rstrip(".")] + tracer._lora_scope[-1:] if p)
            culprit = (module.get_submodule(tracer._lora_scope[-1]) if tracer._lora_scope and tracer._lora_scope[-1]
                       else module)
            raise _trace_error(exc, inner, culprit) from exc
        eager = [w.fqn for w in writes if not w.traced]
        moved = sorted(set(snap.written() + eager + graph_writes(module, graph)) - state)
        try:
            if not moved and writes:  # refuse (or warn about) assignments while the graph still names them
                check_assignments(module, graph, [prefixed(w, prefix) for w in writes], prefix)
        finally:
            restore_state_(snap)  # the trace leaves the module's state as it found it
        if moved:  # written at trace time: trace again with those tensors as graph values
            as_buffers_(module, moved)
            state |= set(moved)
            continue
        new_leaves = tracer.branched - leaf_names - block_names
        if not new_leaves:
            return graph, auto_leaves
        if "" in new_leaves:
            raise TraceError(
                f"module '{prefix.rstrip('.') or '<root>'}' ({type(module).__name__}) branches on self.training in "
                "its forward: a traced graph would freeze one mode. Move that code into a submodule (which "
                "lora_fx then keeps as a leaf that follows train()/eval()), or use frontend='export' with "
                "example_inputs (which checks both modes).")
        leaf_names, auto_leaves = leaf_names | new_leaves, auto_leaves | new_leaves
    raise TraceError(f"the forward of module '{prefix.rstrip('.') or '<root>'}' ({type(module).__name__}) writes "
                     f"{sorted(state)} in a way torch.fx cannot record as graph ops (the write runs while tracing). "
                     "Use frontend='export' with example_inputs, or keep the module that writes them as a leaf "
                     "(leaf_modules=[...]), whose forward then runs as is.")
