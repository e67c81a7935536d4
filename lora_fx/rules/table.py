"""The op table's records, registry and lowering policy (the entries are in :mod:`.modules` and
:mod:`.functional`; :mod:`lora_fx.rules` re-exports everything)."""

from __future__ import annotations

import importlib
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import ops

__all__ = [
    "CONV_FN",
    "CONV_T_FN",
    "Factored",
    "Merged",
    "MERGE",
    "ModuleRule",
    "FunctionRule",
    "module_rule",
    "function_rule",
    "register_module_rule",
    "register_function_rule",
    "choose_lowering",
    "VIEW_OPS",
    "RULE_BACKENDS",
]


@dataclass(frozen=True)
class Factored:
    """How to emit a factored delta node ``fn(y, x, lora_A, lora_B, scaling, *extra)`` after the
    call ``y = op(x, W)``, and that op's lowering policy.

    Attributes:
        fn: the delta op (a :func:`lora_fx.ops.delta_op`), e.g. :func:`lora_fx.ops.linear_delta`.
        x: the node (or value) feeding the adapter branch.
        extra: trailing arguments of ``fn`` (kernel size, padding index, ...).
        dropout: LoRA dropout applies to ``x`` (False where ``x`` is not activations, e.g. the
            indices of an embedding, as in PEFT's Embedding layer).
        recompute: ``fn`` takes ``remat=`` (:mod:`lora_fx.recompute`): ``x`` may be recomputed in
            backward from its producer's inputs instead of being kept.
        fused: ``fn`` takes a fused adapter's trailing ``blocks`` argument (per-block factors).
        cheaper: ``(rank, weight shape) -> bool``: with ``lowering="auto"`` the factored form is
            used only where this holds (None: always cheaper).
    """

    fn: Callable[..., torch.Tensor]
    x: Any
    extra: tuple = ()
    dropout: bool = True
    recompute: bool = False
    fused: bool = False
    cheaper: Optional[Callable[[int, tuple], bool]] = None

    # the built-in delta ops with their policies, one constructor each

    @classmethod
    def linear(cls, x) -> "Factored":
        """:func:`lora_fx.ops.linear_delta` on input ``x``: dropout on ``x``, ``x`` recomputable in
        backward, fused (per-block) adapters supported."""
        return cls(ops.linear_delta, x, recompute=True, fused=True)

    @classmethod
    def embedding(cls, indices, padding_idx=None, scale_grad_by_freq: bool = False) -> "Factored":
        """:func:`lora_fx.ops.embedding_delta`: its input is indices, so no dropout there (as PEFT's
        Embedding layer)."""
        return cls(ops.embedding_delta, indices, (padding_idx, scale_grad_by_freq), dropout=False)

    @classmethod
    def conv(cls, x, kernel_size, stride, padding, dilation) -> "Factored":
        """:func:`lora_fx.ops.conv_delta` (ungrouped): a rank-channel conv plus a 1x1 conv, cheaper
        than merging only for small ranks (``2·rank < min(out, in·k)``)."""
        return cls(ops.conv_delta, x, (tuple(kernel_size), stride, padding, dilation), cheaper=_conv_cheaper)

    @classmethod
    def matmul(cls, x, weight_on_left: bool) -> "Factored":
        """:func:`lora_fx.ops.matmul_delta` for ``x @ W`` (or ``W @ x``)."""
        return cls(ops.matmul_delta, x, (weight_on_left,))


def _conv_cheaper(rank: int, shape: tuple) -> bool:
    # factored conv runs a rank-channel conv plus a 1x1 conv: cheaper only for small ranks
    return rank * 2 < min(shape[0], math.prod(shape[1:]))


@dataclass(frozen=True)
class Merged:
    """How every merge-lowered site is emitted: ``W' = fn(W, dropout(lora_A), lora_B, scaling,
    *blocks)`` (``dora_fn(W, A, B, scaling, magnitude, base_scaling)`` for DoRA) out of place, fed
    to the op.  A merge happens at the weight, before any op reads it, so one policy serves all
    ops.

    Attributes:
        fn, dora_fn: the merge ops (:func:`lora_fx.ops.merge`, :func:`lora_fx.ops.dora_merge`).
        dropout_on_A: LoRA dropout is DropConnect on ``lora_A``'s entries, since no per-example
            input reaches a merged weight.
    """

    fn: Callable[..., torch.Tensor] = ops.merge
    dora_fn: Callable[..., torch.Tensor] = ops.dora_merge
    dropout_on_A: bool = True


#: The merge-lowering policy.
MERGE = Merged()


def choose_lowering(mode: str, forms: Sequence[Optional[Factored]], adapter, shape: tuple) -> str:
    """``"factored"`` or ``"merge"`` for one adapter on one weight, given the factored form of each
    use of the weight (None where the op has none).

    Args:
        mode: ``"auto"`` (factored where exact and cheaper), ``"factored"`` (wherever exact) or
            ``"merge"``.
        forms: :class:`Factored` (or None) per consuming call.
        adapter: the :class:`~lora_fx.adapters.module.LoraAdapter` (its ``rank``, ``layout``,
            ``use_dora``).
        shape: the weight's logical shape.
    """
    if mode == "merge" or not forms or getattr(adapter, "use_dora", False):  # DoRA is always merged
        return "merge"
    for f in forms:
        if f is None or (adapter.layout is not None and not f.fused):
            return "merge"
        if mode == "auto" and f.cheaper is not None and not f.cheaper(adapter.rank, tuple(shape)):
            return "merge"
    return "factored"


@dataclass(frozen=True)
class ModuleRule:
    """Rule for a leaf module type.

    Attributes:
        kind: op kind reported by :func:`lora_fx.sites` (e.g. ``"linear"``, ``"conv2d"``).
        weights: callable ``module -> tuple of parameter names`` adapted when ``targets`` is None.
        merged_call: callable ``(graph, node, module, merged: {param name: Node}) -> Node`` that
            emits a call equivalent to ``node`` with the merged weights; None means
            :func:`lora_fx.ops.module_call` (``torch.func.functional_call``).
        factored: callable ``(node, module, param name) -> Factored | None``.
        blocks: callable ``(module, param name) -> ((block name, rows), ...)``: the default
            fused layout of a weight whose output rows are blocks (MHA ``in_proj_weight``: q, k, v);
            ``()`` for a plain weight (see :mod:`lora_fx.fused`).
        leaf: the torch.fx front-end keeps modules of this type as leaves (never traces their
            forward), e.g. bitsandbytes' linears, whose forward branches on the input.
        prepare: callable ``(module, path) -> str | None``: puts lora_fx's *own copy* of a module in the
            state adapting relies on (called before each adapter is added; idempotent), e.g.
            stopping bitsandbytes from repacking its weight in place.  Never called on the user's model.
            A returned string is a notice for the user, given once per transform (one
            ``LoraFxWarning`` naming every module that returned it).
        after_fold: callable ``module -> module | None`` called by :func:`lora_fx.fold` on each
            module whose weight was folded: a module to put in its place (a ``Linear4bit``
            holding a float weight becomes an ``nn.Linear``), or None to keep it.
        own_graph: callable ``module -> torch.fx.Graph``: the module's forward as a graph over its
            own attributes, used when the module itself is captured (the root of a trace, e.g. a
            module the regions front-end captures on its own) instead of tracing a forward
            torch.fx cannot follow.  None: trace the forward.
    """

    kind: Callable[[nn.Module], str]
    weights: Callable[[nn.Module], tuple[str, ...]] = lambda m: ()
    merged_call: Optional[Callable[..., fx.Node]] = None
    factored: Callable[..., Optional[Factored]] = lambda node, module, pname: None
    blocks: Callable[[nn.Module, str], tuple[tuple[str, int], ...]] = lambda module, pname: ()
    leaf: bool = False
    prepare: Optional[Callable[[nn.Module, str], Optional[str]]] = None
    after_fold: Optional[Callable[[nn.Module], Optional[nn.Module]]] = None
    own_graph: Optional[Callable[[nn.Module], fx.Graph]] = None


@dataclass(frozen=True)
class FunctionRule:
    """Rule for a ``call_function`` target reading a parameter through a ``get_attr`` node.

    Attributes:
        kind: op kind reported by :func:`lora_fx.sites`.
        weight_slots: ``(arg index, kwarg name)`` pairs where a weight may stand (a default target
            only when the parameter stands in one of them).
        factored: callable ``(node, weight slot index, weight shape) -> Factored | None``.
        blocks: callable ``(node, weight slot index, weight shape) -> ((block name, rows), ...)``:
            default fused layout of the weight in that slot, ``()`` for none.
    """

    kind: str
    weight_slots: tuple[tuple[int, str], ...]
    factored: Callable[..., Optional[Factored]] = lambda node, slot, shape: None
    blocks: Callable[..., tuple[tuple[str, int], ...]] = lambda node, slot, shape: ()


_MODULE_RULES: list[tuple[type, ModuleRule]] = []
_FUNCTION_RULES: dict[Any, FunctionRule] = {}

#: ``{top-level package: lora_fx module with its rules}``: rules for a third-party library's modules
#: are imported (and register themselves) the first time :func:`module_rule` sees a module of that
#: package, which is then imported already; lora_fx itself never imports the library.
RULE_BACKENDS = {"bitsandbytes": "lora_fx.rules.bnb"}
_LOADED: set[str] = set()


def _load_backend(module_type: type) -> None:
    package = (getattr(module_type, "__module__", "") or "").partition(".")[0]
    if package in RULE_BACKENDS and package not in _LOADED:
        _LOADED.add(package)
        importlib.import_module(RULE_BACKENDS[package])

#: Ops that only view or re-lay out a tensor: a parameter reaching a consumer through them is the
#: same site (analysis follows them; lowering merges at the parameter).
VIEW_OPS = {
    "t", "transpose", "permute", "view", "reshape", "contiguous", "unsqueeze", "squeeze", "flatten",
    "expand", "to", "type", "float", "half", "bfloat16", "chunk", "split", "narrow", "__getitem__",
    torch.t, torch.transpose, torch.permute, torch.reshape, torch.flatten, torch.squeeze,
    torch.unsqueeze, torch.chunk, torch.split, torch.narrow, operator.getitem,
}


def register_module_rule(module_type: type, rule: ModuleRule) -> None:
    """Register (or override) the rule for leaf modules of ``module_type`` and its subclasses.

    The most recently registered matching type wins, so a rule for a subclass registered after its
    base's rule overrides it.  A module whose forward torch.fx would trace through is only a
    ``call_module`` site when it is kept as a leaf (``transform(..., leaf_modules=[...])``, a
    standard ``torch.nn`` leaf, or a class whose :data:`lora_fx.state.LEAF_ATTR` attribute is True).  Example: a module
    computing ``x @ self.weight.T * self.gain`` is linear in ``weight``, so::

        register_module_rule(ScaledLinear, ModuleRule(
            kind=lambda m: "scaled_linear", weights=lambda m: ("weight",),
            factored=lambda node, m, pname: Factored(scaled_delta, node.args[0], (m.gain,))))

    (``scaled_delta`` a :func:`lora_fx.ops.delta_op`; see the "Extending" docs page).
    """
    _MODULE_RULES.insert(0, (module_type, rule))


def register_function_rule(target: Any, rule: FunctionRule) -> None:
    """Register (or override) the rule for a ``call_function`` / ``call_method`` target (a function,
    an ``OpOverload`` of the torch.export front-end, or a method name).

    Example: ``register_function_rule(my_linear, FunctionRule("linear", ((1, "weight"),),
    factored=lambda node, slot, shape: Factored.linear(node.args[0]) if slot == 1 else None))``
    makes ``my_linear(x, self.w)`` (a function torch.fx keeps as one call, ``torch.fx.wrap``) a
    default site, lowered like ``F.linear``.
    """
    _FUNCTION_RULES[target] = rule


def module_rule(module: nn.Module, *, skip: Optional[ModuleRule] = None) -> ModuleRule:
    """The rule for ``module``: the most recently registered type it is an instance of (ignoring
    the rule ``skip``), else the generic opaque-leaf rule (merge through
    ``torch.func.functional_call``; no default targets).  A module of a package in
    :data:`RULE_BACKENDS` first loads that package's rules."""
    _load_backend(type(module))
    for module_type, rule in _MODULE_RULES:
        if rule is not skip and isinstance(module, module_type):
            return rule
    return _GENERIC_MODULE


def function_rule(target: Any) -> Optional[FunctionRule]:
    """The rule for a call target, or None (any other op: generic merge at the parameter)."""
    try:
        return _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _input(node: fx.Node):
    return _arg(node, 0, "input")


def _attr(graph: fx.Graph, node: fx.Node, name: str):
    return graph.get_attr(f"{node.target}.{name}")


_GENERIC_MODULE = ModuleRule(kind=lambda m: type(m).__name__.lower())

CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}



_aten = torch.ops.aten
VIEW_OPS.update({  # ATen forms (torch.export front-end)
    _aten.t.default, _aten.transpose.int, _aten.permute.default, _aten.view.default, _aten.reshape.default,
    _aten._unsafe_view.default, _aten.unsqueeze.default, _aten.squeeze.default, _aten.squeeze.dim,
    _aten.squeeze.dims, _aten.flatten.using_ints, _aten.expand.default, _aten.alias.default,
    _aten.slice.Tensor, _aten.select.int, _aten.narrow.default, _aten.split.Tensor, _aten.chunk.default,
    _aten.contiguous.default, _aten.to.dtype, _aten.to.dtype_layout, _aten._to_copy.default,
    _aten.type_as.default,
})
