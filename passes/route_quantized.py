"""Prepare a captured model's quantized modules and route linears on quantized weights through the
frozen-base op (run before sites are found; undone by fold).

* :func:`prepare_quantized_`: each module whose rule has a ``prepare`` hook
  (:class:`lora_fx.rules.ModuleRule`) puts lora_fx's own copy in the state adapting relies on
  (bitsandbytes: no in-place CPU repack, a fixed compute dtype, the row scales on the weight); then
  every ``nn.Linear`` call (``call_module`` without hooks) and ``F.linear`` call on a weight whose
  kind has :attr:`~lora_fx.weights.WeightKind.frozen_linear` becomes
  ``quantized_linear(x, W, b, name)`` (:mod:`lora_fx.ops_quantized`), the same function with an
  input gradient that keeps no dequantized copy.  Weights whose input gradient is straight-through
  get one :class:`~lora_fx.errors.LoraFxWarning` listing them.
* :func:`unroute_quantized_`: each ``quantized_linear`` (and merged ``bnb_linear``) call on a
  module's own ``weight`` / ``bias`` is a call of that module again (fold leaves plain modules
  behind).
"""

from __future__ import annotations

import warnings

import torch.nn.functional as F
from torch import fx, nn

from lora_fx import weights
from lora_fx.errors import LoraFxWarning
from lora_fx.ops_quantized import bnb_linear, quantized_linear
from lora_fx.rules import module_rule
from lora_fx.state import regions

__all__ = ["prepare_quantized_", "unroute_quantized_"]


def _routable(mod: nn.Module) -> bool:
    """An ``nn.Linear`` computing ``F.linear(x, weight, bias)`` (its own forward), without hooks,
    on a weight whose kind asks for the frozen-base op."""
    return (isinstance(mod, nn.Linear) and type(mod).forward is nn.Linear.forward
            and not (mod._forward_hooks or mod._forward_pre_hooks)
            and weights.kind_of(mod.weight).frozen_linear)


def _param(gm: fx.GraphModule, node) -> object:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        return gm.get_parameter(node.target)
    except AttributeError:
        return None


def _route(gm: fx.GraphModule, prefix: str, straight: list[str]) -> bool:
    changed = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if isinstance(mod, fx.GraphModule) or not _routable(mod) or len(node.args) != 1 or node.kwargs:
                continue
            name = f"{node.target}.weight"
            with gm.graph.inserting_before(node):
                w = gm.graph.get_attr(name)
                b = gm.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
                new = gm.graph.call_function(quantized_linear, (node.args[0], w, b, prefix + name))
            new.meta.update(node.meta)
            # the weight is read inside the module's own call (as torch.fx records a traced forward):
            # PEFT files and the other module-level views still see the module consuming it
            stack = {**(node.meta.get("nn_module_stack") or {}), node.target: (node.target, type(mod))}
            for read in (w, b):
                if read is not None:
                    read.meta["nn_module_stack"] = stack
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target is F.linear:
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            p = _param(gm, w)
            if p is None or not weights.kind_of(p).frozen_linear:
                continue
            x = node.args[0] if node.args else node.kwargs["input"]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            name = prefix + w.target
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(quantized_linear, (x, w, b, name))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        else:
            continue
        kind = weights.kind_of(gm.get_parameter(new.args[1].target))
        if kind.input_grad(gm.get_parameter(new.args[1].target)) == "straight-through":
            straight.append(new.args[3])
        changed = True
    return changed


def prepare_quantized_(root: nn.Module) -> nn.Module:
    """Run the modules' ``prepare`` hooks and route linears on quantized weights (see the module
    docstring); returns ``root``.  Idempotent (a routed call is not routed again)."""
    notices: dict[str, list[str]] = {}
    for path, mod in root.named_modules():
        hook = module_rule(mod).prepare
        if hook is not None:
            notice = hook(mod, path)
            if notice:
                notices.setdefault(notice, []).append(f"'{path}' ({type(mod).__name__})")
    for notice, where in notices.items():
        shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
        warnings.warn(f"{len(where)} module(s), {shown}: {notice}", LoraFxWarning, stacklevel=4)
    straight: list[str] = []
    for path, gm in regions(root):
        if _route(gm, f"{path}." if path else "", straight):
            gm.graph.lint()
            gm.recompile()
    if straight:
        warnings.warn(
            f"{len(straight)} linear layer(s) quantize their input as well as their weight (torchao's dynamic-activation "
            f"kinds, e.g. {straight[:3]}): their own kernel passes no gradient to its input, so lora_fx uses the "
            "straight-through estimate ∂x = g · dequantize(W) there (the activation rounding treated as identity). "
            "Adapters before these layers train on that estimate; use a weight-only config "
            "(Int8WeightOnlyConfig, IntxWeightOnlyConfig, NF4) for exact gradients.", LoraFxWarning, stacklevel=4)
    return root


def unroute_quantized_(gm: fx.GraphModule) -> fx.GraphModule:
    """Turn each ``quantized_linear(x, W, b, name)`` and ``bnb_linear(x, W, b, dtype)`` call back
    into the call it stands for, in place: a call of module ``<m>`` when ``W`` / ``b`` are
    ``<m>.weight`` / ``<m>.bias`` (an ``nn.Linear``, or for ``bnb_linear`` the bitsandbytes linear
    it was lowered from), else ``F.linear(x, W, b)``.  Returns ``gm``."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (quantized_linear, bnb_linear):
            continue
        x, w, b = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
        owner = w.target[: -len(".weight")] if (isinstance(w, fx.Node) and w.op == "get_attr"
                                               and w.target.endswith(".weight")) else None
        mod = gm.get_submodule(owner) if owner else None
        own = (isinstance(mod, nn.Linear)
               and (node.target is bnb_linear or type(mod).forward is nn.Linear.forward)
               and ((b is None and mod.bias is None)
                    or (isinstance(b, fx.Node) and b.op == "get_attr" and b.target == f"{owner}.bias")))
        if not own and node.target is bnb_linear:
            continue  # a bitsandbytes linear's function on some other weight: leave it
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(owner, (x,)) if own else gm.graph.call_function(F.linear, (x, w, b))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for attr in node.args[1:]:  # the get_attr nodes only this call read
            if isinstance(attr, fx.Node) and attr.op == "get_attr" and not attr.users:
                gm.graph.erase_node(attr)
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
