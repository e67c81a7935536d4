"""Writes to module state during capture: in-place updates and assignments of buffers, parameters
and tensor attributes (a step counter ``self.steps.add_(1)``, an EMA
``self.avg.mul_(m).add_(x.mean(0), alpha=1 - m)``, ``self.buf.copy_(y)``, ``self.count = self.count + 1``).

A captured graph must write the adapted copy's state exactly as the model's forward writes its own,
or the capture must fail.  torch.fx hands a forward its *buffers as real tensors*, so an in-place op
whose arguments are all real runs once at trace time and leaves no node (the adapted model would
never count another step), and an assignment ``self.x = ...`` is not recorded at all.
:mod:`.trace_fx` therefore runs each trace on a snapshot of the state it can reach
(:func:`snapshot_state`, put back by :func:`restore_state_`): an in-place write at trace time (a
tensor's ``_version`` moved) makes it trace again with those tensors as graph values, so the
writes become graph ops on the live buffer; an assignment whose previous value the graph reads is
refused with a :class:`~lora_fx.errors.TraceError`.  The same holds for every module the regions
front-end traces (they are traced in place, on lora_fx's copy).  torch.export keeps in-place writes and buffer assignments as
graph ops; :mod:`.trace_export` refuses assignments of anything that is not a registered buffer,
which it would drop.
"""

from __future__ import annotations

import contextlib
import operator
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import fx, nn

from lora_fx.errors import LoraFxWarning, TraceError

__all__ = ["StateWrite", "StateProxy", "StateSnapshot", "snapshot_state", "restore_state_", "record_state_writes",
           "tensor_versions", "written_in_place", "assignment_error", "is_inplace", "written_attr", "split_writes",
           "rewritten_warning", "restoring_tensor_attributes", "graph_writes", "check_assignments", "prefixed",
           "as_buffers_"]


@dataclass(frozen=True)
class StateWrite:
    """One assignment ``module.name = value`` of a tensor made by a forward during capture.

    Attributes:
        path: the module's path in the captured model (``""`` for the root).
        module: the module's class name.
        name: the attribute assigned.
        kind: ``"buffer"``, ``"parameter"`` or ``"attribute"`` (a plain attribute, new or not).
        previous: ``id()`` of the value it replaced (0 when the attribute was new), to tell whether
            the captured graph read it.
        traced: the value was a graph value (a torch.fx ``Proxy``, or a torch.export fake
            tensor), not a tensor computed once at capture.
    """

    path: str
    module: str
    name: str
    kind: str
    previous: int = 0
    traced: bool = True

    @property
    def fqn(self) -> str:
        return f"{self.path}.{self.name}" if self.path else self.name


def _is_tensor_like(value) -> bool:
    return isinstance(value, (torch.Tensor, fx.Proxy))


_INPLACE_OPERATORS = frozenset({operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                                operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                                operator.ilshift, operator.irshift, operator.imatmul})


def is_inplace(node: fx.Node) -> bool:
    """Whether ``node`` writes its first argument in place (``t.add_(x)``, ``t += x``, ``t[i] = v``)."""
    if node.op == "call_method":
        name = str(node.target)
        return (name.endswith("_") and not name.startswith("__")) or name in (
            "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__",
            "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__")
    return node.op == "call_function" and (node.target in _INPLACE_OPERATORS or node.target is operator.setitem)


def written_attr(node: fx.Node) -> Optional[fx.Node]:
    """The ``get_attr`` node a chain of in-place ops ending at ``node`` writes, or None."""
    while is_inplace(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node if node.op == "get_attr" else None


@contextlib.contextmanager
def record_state_writes(model: nn.Module, *, alias: Optional[Callable[[object], object]] = None,
                        traced: Callable[[object], bool] = lambda value: True) -> Iterator[list[StateWrite]]:
    """Within the block, every assignment of a tensor (or a torch.fx ``Proxy``) to an attribute of a
    module of ``model`` is recorded in the yielded list (the assignment itself still happens).
    ``nn.Module.__setattr__`` is patched for the block, as torch.fx patches ``Module.__call__``
    while tracing; attributes torch.fx itself stores (``_tensor_constant*``) are not recorded.

    ``alias(value)``: the tensor that ``value`` is (the object an in-place op wrote), or None.  An
    assignment of a tensor to the attribute already holding it (``self.buf += x``, which writes
    ``buf`` in place and rebinds the same object) changes nothing: it is neither made nor recorded.
    ``traced(value)``: whether the value is a graph value (:attr:`StateWrite.traced`)."""
    paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
    writes: list[StateWrite] = []
    original = nn.Module.__setattr__

    def setattr_recorded(self, name, value):
        if id(self) in paths and _is_tensor_like(value) and not name.startswith("_tensor_constant"):
            current = self._buffers[name] if name in self._buffers else vars(self).get(name)
            if current is not None and (value is current or (alias is not None and alias(value) is current)):
                return  # the same object, written in place (``self.buf += x``): the in-place op is the write
            kind = ("buffer" if name in self._buffers else "parameter" if name in self._parameters
                    else "attribute")
            old = current if current is not None else self._parameters.get(name)
            writes.append(StateWrite(paths[id(self)], type(self).__name__, name, kind,
                                     0 if old is None else id(old), traced=traced(value)))
        original(self, name, value)

    nn.Module.__setattr__ = setattr_recorded
    try:
        yield writes
    finally:
        nn.Module.__setattr__ = original


def tensor_versions(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """``{name: (tensor, version counter)}`` of every buffer and plain tensor attribute of ``model``
    (parameters are graph values on every front-end, never written at capture)."""
    out = {}
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        for name, t in m._buffers.items():
            if t is not None:
                out[prefix + name] = (t, t._version)
        for name, t in vars(m).items():
            if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
                out[prefix + name] = (t, t._version)
    return out


@contextlib.contextmanager
def restoring_tensor_attributes(model: nn.Module) -> Iterator[None]:
    """Put back, on leaving the block, the value of every plain tensor attribute of ``model`` written
    in place inside it: torch.export records such a write as a graph op on the lifted constant
    *and* runs it on the real tensor (the adapted model would start one step on)."""
    saved = [(t, t._version, t.detach().clone()) for path, m in model.named_modules() for t in vars(m).values()
             if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter)]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, version, value in saved:
                if t._version != version:
                    t.copy_(value)


def written_in_place(before: dict[str, tuple[torch.Tensor, int]]) -> list[str]:
    """Names in ``before`` (:func:`tensor_versions`) whose tensor was written in place since."""
    return sorted(n for n, (t, v) in before.items() if t._version != v)


def as_buffers_(model: nn.Module, names) -> nn.Module:
    """Make each plain tensor attribute named in ``names`` a non-persistent buffer of its module
    (same tensor; ``state_dict`` keys unchanged), so a tracer can hand it to the forward as a graph
    value; returns ``model``.  Buffers are left as they are."""
    for fqn in names:
        path, _, name = fqn.rpartition(".")
        m = model.get_submodule(path) if path else model
        t = vars(m).get(name)
        if isinstance(t, torch.Tensor) and name not in m._buffers:
            delattr(m, name)
            m.register_buffer(name, t, persistent=False)
    return model


def split_writes(writes: list[StateWrite], read_names: set[str], read_ids: set[int]
                 ) -> tuple[list[StateWrite], list[StateWrite]]:
    """``(carried, rewritten)``: assignments whose previous value the captured graph reads (state
    carried from one call to the next, such as ``self.count = self.count + 1``), and assignments of
    values recomputed before any use (the deprecated ``torch.nn.utils.weight_norm`` hook assigns
    ``weight`` before the layer reads it), whose loss changes no output."""
    carried = [w for w in writes if w.fqn in read_names or (w.previous and w.previous in read_ids)]
    return carried, [w for w in writes if w not in carried]


def rewritten_warning(writes: list[StateWrite], frontend: str) -> str:
    """The :class:`~lora_fx.errors.LoraFxWarning` text for assignments that are not kept but
    change no output (:func:`split_writes`)."""
    shown = sorted({f"'{w.fqn}' ({w.kind} of {w.module})" for w in writes})
    return (f"the forward assigns {', '.join(shown)} without reading its previous value; the {frontend} capture "
            "does not keep the assignment (outputs are exact: the value is computed anew in every call), so that "
            "attribute of the adapted model keeps its value from before the capture.")


def assignment_error(writes: list[StateWrite], frontend: str, model: nn.Module) -> TraceError:
    """The :class:`TraceError` for assignments a front-end cannot keep: names each module, attribute
    and the fix."""
    shown = sorted({f"'{w.fqn}' ({w.kind} of module '{w.path or '<root>'}', {w.module})" for w in writes})
    if frontend == "fx":
        fix = ("write the tensor in place instead (self.count.add_(1), self.avg.mul_(m).add_(x, alpha=1 - m), "
               "self.buf.copy_(value)), which lora_fx keeps as graph ops on the live buffer; or use "
               "frontend='export' with example_inputs, which keeps assignments of registered buffers")
    else:
        fix = ("register the tensor as a buffer (self.register_buffer(name, tensor, persistent=False)) and write "
               "it in place or assign it; torch.export keeps writes to registered buffers")
    return TraceError(
        f"the forward of {type(model).__name__} assigns module state that the {frontend} capture would not keep: "
        f"{', '.join(shown)}; the adapted model would silently stop updating it. How to fix: {fix}.")


# ------------------------------------------------------------------------------------------------
# torch.fx: snapshots around each trace, graph values for written tensors


def _inplace_dunder(method: str):
    def dunder(self, other):
        return self.tracer.create_proxy("call_method", method, (self, other), {})
    return dunder


class StateProxy(fx.Proxy):
    """The graph value of a buffer the forward writes: ``buf += x`` and ``buf[i] = v`` are
    recorded as in-place ops on the buffer, as they run in eager mode (a plain ``Proxy`` records
    ``buf + x`` and refuses item assignment)."""

    __iadd__ = _inplace_dunder("add_")
    __isub__ = _inplace_dunder("sub_")
    __imul__ = _inplace_dunder("mul_")
    __itruediv__ = _inplace_dunder("div_")
    __ipow__ = _inplace_dunder("pow_")
    __iand__ = _inplace_dunder("bitwise_and_")
    __ior__ = _inplace_dunder("bitwise_or_")
    __ixor__ = _inplace_dunder("bitwise_xor_")

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


@dataclass
class StateSnapshot:
    """The buffers and plain tensor attributes of a module tree before a trace (see
    :func:`snapshot_state`): ``entries`` holds ``(owner, name, is_buffer, tensor, version, value)``
    with ``name`` relative to the traced module in ``names``."""

    entries: list = field(default_factory=list)
    names: list = field(default_factory=list)
    owners: dict = field(default_factory=dict)  # id(owner) -> (owner, set of its tensor attribute names)

    def written(self) -> list[str]:
        """Names of the tensors written in place since the snapshot."""
        return [n for n, (_, _, _, t, v, _) in zip(self.names, self.entries) if t._version != v]


def snapshot_state(module: nn.Module, *, skip: Iterable[str] = ()) -> StateSnapshot:
    """Copies of the buffers and plain tensor attributes of ``module`` and of the submodules a
    trace runs (not those under the paths in ``skip``: leaves and blocks are called, not run)."""
    skip = tuple(skip)
    snap = StateSnapshot()
    for path, m in module.named_modules():
        if any(path == s or path.startswith(s + ".") for s in skip):
            continue
        prefix = f"{path}." if path else ""
        attrs = {k for k, v in vars(m).items() if isinstance(v, torch.Tensor)}
        snap.owners[id(m)] = (m, attrs)
        for name, t in m._buffers.items():
            if t is not None:
                snap.entries.append((m, name, True, t, t._version, t.detach().clone()))
                snap.names.append(prefix + name)
        for name in attrs:
            t = vars(m)[name]
            if not isinstance(t, nn.Parameter):
                snap.entries.append((m, name, False, t, t._version, t.detach().clone()))
                snap.names.append(prefix + name)
    return snap


def restore_state_(snap: StateSnapshot) -> StateSnapshot:
    """Put every tensor of ``snap`` back (the same objects, their old values) and drop tensor
    attributes a trace added (but the ``_tensor_constant*`` that torch.fx stores); returns ``snap``."""
    with torch.no_grad():
        for owner, name, is_buffer, t, version, value in snap.entries:
            if is_buffer and name in owner._buffers:
                owner._buffers[name] = t
            elif is_buffer:  # made a plain attribute again? put the buffer back where it was
                owner.__dict__.pop(name, None)
                owner._buffers[name] = t
            elif name in owner._buffers:  # a plain attribute turned buffer since: keep the buffer, same object
                owner._buffers[name] = t
            else:
                owner.__dict__[name] = t
            if t._version != version:
                t.copy_(value)
    for owner, attrs in snap.owners.values():
        for name in [k for k, v in vars(owner).items() if isinstance(v, (torch.Tensor, fx.Proxy))
                     and k not in attrs and not k.startswith("_tensor_constant")]:
            del owner.__dict__[name]
    return snap


def graph_writes(module: nn.Module, graph: fx.Graph) -> list[str]:
    """Buffers and tensor attributes of ``module`` that in-place ops of ``graph`` write (names
    relative to ``module``): every read of them must be a graph value too (an eager read at trace
    time would be a stale constant)."""
    attrs = {id(t): n for n, (t, _) in tensor_versions(module).items()}
    out = []
    for n in graph.nodes:
        target = written_attr(n) if is_inplace(n) else None
        if target is None:
            continue
        owner, _, name = str(target.target).rpartition(".")
        try:
            holder = module.get_submodule(owner) if owner else module
        except AttributeError:
            continue
        value = holder._buffers.get(name) if name in holder._buffers else vars(holder).get(name)
        if isinstance(value, torch.Tensor) and id(value) in attrs:
            out.append(attrs[id(value)])
    return out


def check_assignments(module: nn.Module, graph: fx.Graph, writes: list[StateWrite], prefix: str) -> None:
    """Refuse the assignments whose previous value ``graph`` reads (state carried across calls);
    warn about the others (computed anew in every call, so no output changes).

    Raises:
        TraceError: :func:`assignment_error` of the carried ones.
    """
    names, ids = set(), set()
    for n in graph.nodes:
        if n.op == "get_attr":
            names.add(prefix + str(n.target))
            owner, _, attr = str(n.target).rpartition(".")
            try:
                holder = module.get_submodule(owner) if owner else module
            except AttributeError:
                continue
            value = vars(holder).get(attr, holder._buffers.get(attr, holder._parameters.get(attr)))
            if value is not None:
                ids.add(id(value))
    carried, rewritten = split_writes(writes, names, ids)
    if carried:
        raise assignment_error(carried, "fx", module)
    warnings.warn(rewritten_warning(rewritten, "fx"), LoraFxWarning, stacklevel=6)


def prefixed(w: StateWrite, prefix: str) -> StateWrite:
    """``w`` with its path relative to the model (``prefix``: the traced module's path plus ``.``)."""
    path = f"{prefix}{w.path}" if w.path else prefix.rstrip(".")
    return StateWrite(path, w.module, w.name, w.kind, w.previous, w.traced)
