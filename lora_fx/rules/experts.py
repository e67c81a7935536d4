"""Op-table entries for stacks of expert weights (mixture-of-experts layers).

A *stack* is a 3-D parameter ``W (E, d1, d2)`` whose consumers read one expert matrix at a time:
``F.linear(x, W[e])`` in a loop, ``grouped_mm(x, W.transpose(-2, -1), offs)``, ``bmm(W[ids], x)``,
``x @ W[e]``.  Its adapter has one factor pair per expert (``lora_A (E, r, in)``,
``lora_B (E, out, r)``, :mod:`lora_fx.ops_experts`), and its consumers see a lazy ``W + ΔW``
(:class:`lora_fx.lazy_weight.LoraWeight`) that computes each of them factored.  Which orientation
``(out, in)`` the op consumes is found from the op, never from a layout flag:

* in a captured graph, statically (:func:`attr_stack`): the view ops between the parameter and each
  consumer, and the consumer's operand order;
* in a module whose own code reads the stack (a kept leaf, e.g. Hugging Face's ``*Experts``
  modules, whose expert loop is data-dependent), by running it once on two tokens with zero factors
  (:func:`probe_stack`, :func:`lora_fx.lazy_weight.probe`).

Stacks are never default targets: name them (``targets=["*.experts.gate_up_proj", ...]``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import lazy_weight, ops_experts  # noqa: F401  (ops_experts: registers the lora_weight graph op)
from .table import ModuleRule, register_module_rule

__all__ = ["ExpertStack", "STACK_REASON", "attr_stack", "probe_stack", "probed_stack", "is_hf_experts",
           "hf_experts_stack"]

#: Why a stack of expert weights is not adapted unless it is named in ``targets``.
STACK_REASON = ("a stack of expert weights: per-expert adapters are added only when targeted by name, "
                "e.g. targets=['*.experts.gate_up_proj', '*.experts.down_proj']")


@dataclass(frozen=True)
class ExpertStack:
    """How a 3-D parameter is consumed as a stack of expert matrices.

    Attributes:
        experts: ``E``, the stack's first dim.
        transposed: stored ``(E, in, out)`` (the op computes ``x @ W[e]``); else ``(E, out, in)``.
        consumer: the consuming op(s): ``"linear"``, ``"grouped_mm"``, ``"bmm"``, ``"matmul"``
            (``+``-joined), or ``"merge"`` when no consumer has a factored form.
        factored: every read is computed factored (else some get the merged value at run time).
    """

    experts: int
    transposed: bool
    consumer: str
    factored: bool

    @property
    def op(self) -> str:
        """The op kind reported by :func:`lora_fx.sites`: ``"experts:<consumer>"``."""
        return f"experts:{self.consumer}"


# ---------------------------------------------------------------------------------------------
# static: a parameter read through views by stack consumers in a captured graph

_aten = torch.ops.aten
#: (consumer kind, operand slot of the weight) -> the weight view must be (in, out) ("transposed")
_TERMINALS: dict = {}
for _f in (F.linear, _aten.linear.default):
    _TERMINALS[(_f, 1)] = ("linear", False, 2)
for _f in (torch.matmul, operator.matmul, torch.mm, "matmul", "mm", "__matmul__", _aten.mm.default,
           _aten.matmul.default):
    _TERMINALS[(_f, 1)] = ("matmul", True, 2)
    _TERMINALS[(_f, 0)] = ("matmul", False, 2)
for _f in (torch.bmm, "bmm", _aten.bmm.default):
    _TERMINALS[(_f, 0)] = ("bmm", False, 3)
    _TERMINALS[(_f, 1)] = ("bmm", True, 3)
for _f in (torch._grouped_mm, _aten._grouped_mm.default, F.grouped_mm):
    _TERMINALS[(_f, 1)] = ("grouped_mm", True, 3)


def _grouped_fallbacks() -> tuple:
    lazy_weight.register_transformers_ops()
    return tuple(f for f in lazy_weight.HANDLERS if "grouped_mm_fallback" in str(f))


def _terminal(node: fx.Node, slot: int):
    if node.op not in ("call_function", "call_method"):
        return None
    hit = _TERMINALS.get((node.target, slot)) if _hashable(node.target) else None
    if hit is None and slot == 1 and node.op == "call_function" and node.target in _grouped_fallbacks():
        hit = ("grouped_mm", True, 3)
    return hit


def _hashable(t) -> bool:
    try:
        hash(t)
        return True
    except TypeError:
        return False


def _view_step(node: fx.Node, ndim: int) -> Optional[tuple[int, bool]]:
    """``(ndim after, flips)`` when ``node`` (reading the weight as its first argument) is a view
    a lazy weight keeps lazy; else None."""
    t, args = node.target, node.args
    if node.op == "call_function" and t in (operator.getitem,) or node.op == "call_method" and t == "__getitem__":
        idx = args[1]
        if isinstance(idx, (int, fx.Node)) and not isinstance(idx, bool) and ndim >= 3:
            return ndim - 1, False  # W[e] (or W[ids]: the view's dims are then counted as 3; see below)
        return None
    if t in (_aten.select.int,) and len(args) >= 3 and args[1] in (0, -ndim) and ndim >= 3:
        return ndim - 1, False
    if t in (_aten.index.Tensor,) and len(args[1]) == 1 and ndim >= 3:
        return ndim, False  # a gather W[ids]: (S, d1, d2)
    if t in (torch.transpose, "transpose", _aten.transpose.int, "swapaxes", torch.swapaxes):
        dims = [d % ndim for d in args[1:3] if isinstance(d, int)]
        return (ndim, True) if sorted(dims) == [ndim - 2, ndim - 1] else None
    if t in ("t", torch.t, _aten.t.default) and ndim == 2:
        return ndim, True
    if node.op == "call_function" and t is getattr and args[1] == "mT":
        return ndim, True
    if t in ("contiguous", _aten.contiguous.default, _aten.alias.default, "to", _aten.to.dtype):
        return ndim, False
    return None


def attr_stack(weight: fx.Node, shape: tuple) -> Optional[ExpertStack]:
    """The :class:`ExpertStack` of a 3-D parameter read by ``weight`` (a ``get_attr`` node, or the
    end of its merge chain) when every read reaches a stack consumer through views a lazy weight
    keeps lazy, all agreeing on the orientation; else None (an ordinary site)."""
    if len(shape) != 3:
        return None
    kinds, orient = [], set()
    stack = [(weight, 3, False)]
    while stack:
        node, ndim, flipped = stack.pop()
        for user in node.users:
            slots = [i for i, a in enumerate(user.args) if a is node]
            if len(slots) != 1 or any(v is node for v in user.kwargs.values()):
                return None
            slot = slots[0]
            term = _terminal(user, slot)
            if term is not None:
                kind, want_t, want_dim = term
                if ndim != want_dim and not (kind == "bmm" and ndim == 2):
                    return None
                kinds.append(kind)
                orient.add(want_t != flipped)
                continue
            step = _view_step(user, ndim) if slot == 0 else None
            if step is None:
                return None
            stack.append((user, step[0], flipped != step[1]))
    if not kinds or len(orient) != 1:
        return None
    return ExpertStack(int(shape[0]), orient.pop(), "+".join(dict.fromkeys(kinds)), True)


# ---------------------------------------------------------------------------------------------
# dynamic: a module whose own code reads the stack


def probe_stack(module: nn.Module, pname: str, args: tuple, kwargs: Optional[dict] = None, *,
                fallback_transposed: bool = False) -> ExpertStack:
    """The :class:`ExpertStack` of ``module``'s parameter ``pname``, found by running
    ``module(*args, **kwargs)`` once with zero factors (:func:`lora_fx.lazy_weight.probe`).  A
    module on the meta device, or one the probe cannot run, keeps ``fallback_transposed`` and is
    reported ``"merge"`` (its reads get the merged value unless they turn out factored)."""
    w = module.get_parameter(pname)
    found = None
    if w.device.type != "meta":
        try:
            found = lazy_weight.probe(module, pname, args, kwargs)
        except Exception:  # the module cannot run on the synthetic inputs: no probe, merged reads
            found = None
    if found is None:
        return ExpertStack(int(w.shape[0]), bool(fallback_transposed), "merge", False)
    transposed, kinds = found
    return ExpertStack(int(w.shape[0]), transposed, "+".join(kinds), True)


def probed_stack(example_args: Callable[[nn.Module, torch.Tensor], tuple], *,
                 stacks: Optional[Callable[[nn.Module], tuple[str, ...]]] = None):
    """A :attr:`ModuleRule.stack <lora_fx.rules.ModuleRule>` callable for a module of your own that
    reads 3-D expert stacks: ``example_args(module, weight)`` returns small positional arguments
    for one call (on ``weight``'s device and dtype); ``stacks(module)`` names the stack
    parameters (default: every 3-D parameter).  Example::

        register_module_rule(MyExperts, ModuleRule(kind=lambda m: "experts", stack=probed_stack(
            lambda m, w: (torch.randn(2, m.hidden, dtype=w.dtype), torch.tensor([0, 1])))))
    """

    def stack(module: nn.Module, pname: str) -> Optional[ExpertStack]:
        names = stacks(module) if stacks is not None else tuple(
            n for n, p in module.named_parameters(recurse=False) if p.dim() == 3)
        if pname not in names:
            return None
        return probe_stack(module, pname, example_args(module, module.get_parameter(pname)))

    return stack


# ---------------------------------------------------------------------------------------------
# Hugging Face transformers MoE experts (``@use_experts_implementation`` classes)


def is_hf_experts(module: nn.Module) -> bool:
    """A transformers experts module: a class decorated with ``use_experts_implementation``
    (``num_experts``, ``config._experts_implementation``, ``is_transposed``, ``has_gate``) holding
    3-D stacks ``(num_experts, ·, ·)``."""
    return (type(module).__module__.startswith("transformers.") and isinstance(getattr(module, "num_experts", None), int)
            and hasattr(module, "is_transposed") and hasattr(module, "has_gate")
            and hasattr(getattr(module, "config", None), "_experts_implementation"))


def _hf_stacks(module: nn.Module) -> tuple[str, ...]:
    return tuple(n for n, p in module.named_parameters(recurse=False)
                 if p.dim() == 3 and p.shape[0] == module.num_experts)


def _hf_probe_args(module: nn.Module, w: torch.Tensor) -> tuple:
    """Two tokens routed to distinct experts: ``(hidden (2, H), top_k_index (2, k), top_k_weights (2, k))``."""
    k = max(1, min(int(getattr(module.config, "num_experts_per_tok", 1) or 1), module.num_experts))
    hidden = int(module.config.hidden_size)
    index = torch.tensor([[(t * k + j) % module.num_experts for j in range(k)] for t in range(2)], device=w.device)
    return (torch.randn(2, hidden, generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype), index,
            torch.full((2, k), 1.0 / k, device=w.device, dtype=w.dtype))


def hf_experts_stack(module: nn.Module, pname: str) -> Optional[ExpertStack]:
    """:attr:`ModuleRule.stack` of transformers experts: the 3-D stacks, probed with the
    experts' call signature ``(hidden_states, top_k_index, top_k_weights)``."""
    if pname not in _hf_stacks(module):
        return None
    lazy_weight.register_transformers_ops()
    w = module.get_parameter(pname)
    return probe_stack(module, pname, _hf_probe_args(module, w), fallback_transposed=bool(module.is_transposed))


register_module_rule(is_hf_experts, ModuleRule(kind=lambda m: "experts", stack=hf_experts_stack))
