"""Front-end: ``torch.export`` capture rebuilt into a lora_fx ``GraphModule`` hierarchy.

Models that ``torch.fx.symbolic_trace`` cannot trace (data-dependent Python control flow, today's
HF transformers) are captured with ``torch.export.export(..., strict=False)`` on example inputs,
then ``torch.export.unflatten`` restores the module hierarchy: every called submodule of the
original model becomes its own :class:`~lora_fx.graph_module.LoraGraphModule` holding an ATen-level
graph, called by its parent, with its parameters and buffers under their original names.  So
``state_dict`` keys equal the original model's, blocks stay called submodules (per-block FSDP,
checkpointing, regional compile), and the same site rules (ATen entries in :mod:`lora_fx.rules`)
and passes (find_sites, insert_lora, fold) apply.

Train / eval.  An exported graph bakes the training flag of every op in.  lora_fx exports a copy
in **train mode** (the mode that records every dropout probability) and then makes the graph
follow ``self.training`` of the ``GraphModule`` holding each op
(:func:`~lora_fx.passes.follow_mode.follow_mode_`).  Other Python branches on ``self.training``
would stay baked in train form, so :func:`export_hierarchy` checks the result against the model in
eval mode on the example inputs and raises if they differ.

Dynamic shapes: by default every dimension of every example tensor is ``Dim.AUTO`` (sizes seen
as 0 or 1 specialise), so a model captured with a batch of 2 runs with a batch of 8.  What the
capture specialised on (a size range after a branch on a shape, a fixed size, a baked-in
non-tensor argument) is checked on every call (:mod:`.guards`): an input outside it raises
:class:`~lora_fx.errors.InputGuardError` instead of running the branch taken at capture.
"""

from __future__ import annotations

import copy
import inspect
import os
import warnings
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.export.unflatten import InterpreterModule, InterpreterModuleDispatcher
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from lora_fx import weights
from lora_fx.errors import ConfigError, LoraFxWarning, TraceError, user_frame
from lora_fx.state import FRONTEND_META

from .follow_mode import follow_mode_
from .guards import guard_inputs_, input_guards
from .state_writes import (assignment_error, record_state_writes, restoring_tensor_attributes, rewritten_warning,
                           split_writes, tensor_versions)
from .trace_fx import LoraTracer, build_graph_module

__all__ = [
    "export_hierarchy",
    "export_error",
    "normalize_example_inputs",
    "default_dynamic_shapes",
    "resolve_dynamic_shapes",
]

# ------------------------------------------------------------------------------------------------
# example inputs


def normalize_example_inputs(
    model: nn.Module, example_inputs: Any, example_kwargs: Optional[dict]
) -> tuple[tuple, dict, list[str]]:
    """Check ``example_inputs`` / ``example_kwargs`` against ``model.forward``'s signature.

    Args:
        model: the module to be captured.
        example_inputs: a tuple of positional arguments (a single tensor is wrapped as ``(x,)``).
        example_kwargs: a dict of keyword arguments, or None.

    Returns:
        ``(args, kwargs, names)``: ``names`` are the parameter names the arguments bind to.

    Raises:
        ConfigError: wrong container types, or arguments that do not bind to ``forward``
            (too many, unknown keyword, missing required), naming the mismatch.
    """
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, tuple):
        raise ConfigError(
            f"example_inputs must be a tuple of positional arguments for {type(model).__name__}.forward, got "
            f"{type(example_inputs).__name__}; wrap it: example_inputs=(x,) (keyword arguments go in "
            "example_kwargs={...}).")
    kwargs = {} if example_kwargs is None else example_kwargs
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ConfigError(f"example_kwargs must be a dict {{name: value}}, got {type(kwargs).__name__}")
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return example_inputs, dict(kwargs), [f"arg_{i}" for i in range(len(example_inputs))] + list(kwargs)
    try:
        bound = sig.bind(*example_inputs, **kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"example inputs do not match {type(model).__name__}.forward{sig}: {exc} (got "
            f"{len(example_inputs)} positional argument(s) and keywords {sorted(kwargs)}). Pass "
            "example_inputs=(positional, ...) and example_kwargs={name: value} as forward takes them.") from exc
    names = []
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            names.extend(f"{name}_{i}" for i in range(len(value)))
        elif kind is not inspect.Parameter.VAR_KEYWORD and name not in kwargs:
            names.append(name)
    return example_inputs, dict(kwargs), names[:len(example_inputs)] + list(kwargs)


def resolve_dynamic_shapes(dynamic_shapes: Any, args: tuple, kwargs: dict):
    """``None`` → :func:`default_dynamic_shapes`; ``False`` → static shapes (``None`` for
    ``torch.export``, faster to export, fixed sizes); anything else is passed through."""
    if dynamic_shapes is None:
        return default_dynamic_shapes(args, kwargs)
    return None if dynamic_shapes is False else dynamic_shapes


def default_dynamic_shapes(args: tuple, kwargs: dict):
    """``Dim.AUTO`` for every dimension of every tensor in ``args`` and ``kwargs`` (``None`` for
    non-tensors), as the ``(args, kwargs)`` structure ``torch.export.export`` accepts."""
    def spec(x):
        return {d: torch.export.Dim.AUTO for d in range(x.dim())} if isinstance(x, torch.Tensor) else None
    spec_args = tuple(pytree.tree_map(spec, a) for a in args)
    spec_kwargs = {k: pytree.tree_map(spec, v) for k, v in kwargs.items()}
    return spec_args + tuple(spec_kwargs.values()) if spec_kwargs else spec_args


# ------------------------------------------------------------------------------------------------
# unflattened program -> LoraGraphModule hierarchy


def _rebuild(module: nn.Module, path: str, original: nn.Module) -> nn.Module:
    """Replace every InterpreterModule under ``module`` (bottom-up) by a LoraGraphModule."""
    if isinstance(module, InterpreterModuleDispatcher):
        raise TraceError(
            f"module '{path}' is called more than once in the forward; the export front-end keeps one graph per "
            "module, so it cannot rebuild a module reused in several places. Use frontend='fx' (with "
            f"leaf_modules=['{path}'] if needed), or give each call its own module.")
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _rebuild(child, f"{path}.{name}" if path else name, original)
    if not isinstance(module, InterpreterModule) and not hasattr(module, "graph"):
        return module
    try:
        orig = original.get_submodule(path) if path else original
    except AttributeError:
        orig = module
    if isinstance(orig, (nn.ModuleList, nn.ModuleDict)) and type(orig).forward is nn.Module.forward:
        # containers stay containers (never called; a ParametrizationList is a ModuleList that is called)
        container = type(orig)()
        for name, child in module._modules.items():
            container._modules[name] = child
        return container
    cls_name = type(orig).__name__
    graph = copy.deepcopy(module.graph)
    graph._tracer_cls = LoraTracer  # so pickles re-trace with lora_fx ops as leaves
    for node in graph.nodes:
        if node.name == "self":  # a child called `self` (BERT's attention): would shadow forward's self
            node._rename(f"{node.op}_self")
    gm = build_graph_module(module, graph)
    gm.__class__.__name__ = cls_name  # GraphModule makes a class per instance; name it as the original
    return follow_mode_(gm)


def export_error(exc: BaseException, model: nn.Module) -> TraceError:
    """The :class:`~lora_fx.errors.TraceError` for a failed ``torch.export`` of ``model``: the user's
    line and the fix for that kind of failure."""
    frame = user_frame(exc, also_skip=(os.path.dirname(os.path.abspath(__file__)),), skip_synthetic=True)
    where = f" at {frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else ""
    text = str(exc).strip()
    summary = (text.split("\n") or [""])[0][:400]
    kind = type(exc).__name__
    if "in output, which is not a known type" in text or "register a pytree" in text or "pytree" in kind.lower():
        cache = "cache" in text.lower()
        fix = ("the forward returns (or takes) an object torch.export cannot flatten into tensors"
               + (": a transformers model's KV cache; build the model with use_cache=False (config.use_cache=False)"
                  if cache else "; return tensors (or tuples, lists, dicts and dataclasses of them), or register the "
                  "type with torch.utils._pytree.register_pytree_node"))
    elif "data-dependent" in text.lower() or "DataDependent" in kind or "Could not guard on" in text:
        fix = ("Python control flow depends on tensor values: write the failing line with torch.where / torch.cond "
               "instead of `if tensor:` (or .item())")
    else:
        fix = ("check that example_inputs / example_kwargs are what forward expects (shapes, dtypes, which "
               "arguments), or use frontend='fx' with leaf_modules=[...] for the module that fails")
    return TraceError(f"torch.export could not capture {type(model).__name__}{where}: {kind}: {summary}\n"
                      f"How to fix: {fix}.")


def _refuse_quantized(model: nn.Module) -> None:
    """torch.export (torch 2.13) cannot capture quantized weights: ``unflatten`` fails on torchao's
    tensor subclasses, and bitsandbytes' parameters cannot be created from fake tensors."""
    found = [(n, weights.kind_of(p).name) for n, p in model.named_parameters() if not weights.is_plain(p)]
    if found:
        raise TraceError(
            f"the torch.export front-end cannot capture quantized weights ({len(found)}: "
            f"{', '.join(f'{n} ({k})' for n, k in found[:3])}{', ...' if len(found) > 3 else ''}): torch.export "
            "does not rebuild torchao's tensor subclasses or bitsandbytes' parameters.\nHow to fix: use the torch.fx "
            "front-end (frontend='fx', or 'auto' without example inputs), which keeps quantized layers as they are.")


def export_hierarchy(
    model: nn.Module,
    example_inputs: tuple,
    example_kwargs: Optional[dict] = None,
    *,
    dynamic_shapes: Any = None,
    check_modes: bool = True,
) -> fx.GraphModule:
    """Capture ``model`` (which the caller owns) with ``torch.export`` and rebuild its hierarchy.

    Args:
        model: the module to capture (a private copy of the user's model; it is put in train mode
            for the capture and restored afterwards; its parameters are shared with the result).
        example_inputs: tuple of positional example arguments (tensors of representative dtype
            and rank; sizes are dynamic by default).
        example_kwargs: keyword example arguments.
        dynamic_shapes: as ``torch.export.export``'s; default (None): ``Dim.AUTO`` everywhere;
            False: static (the result then only runs on the example sizes).
        check_modes: compare the result with ``model`` in eval mode on the example inputs.

    Returns:
        a :class:`~lora_fx.graph_module.LoraGraphModule` whose forward takes the same arguments as
        ``model.forward`` (by the example's structure), returns the same structure, and whose
        ``state_dict`` keys equal ``model.state_dict()``'s.  ``meta[FRONTEND_META] == "export"`` (:mod:`lora_fx.state`).

    Raises:
        ConfigError: example inputs of the wrong structure.
        TraceError: torch.export failed (names the line and the fix), a module is called more than
            once, or the graph differs from the model in eval mode (Python branches on
            ``self.training`` other than dropout / batch norm / attention dropout).
    """
    args, kwargs, names = normalize_example_inputs(model, example_inputs, example_kwargs)
    _refuse_quantized(model)
    shapes = resolve_dynamic_shapes(dynamic_shapes, args, kwargs)
    modes = {name: m.training for name, m in model.named_modules()}
    model.train()
    try:
        # torch.export keeps in-place writes and assignments of registered buffers as graph ops, and
        # drops assignments of other tensors (plain attributes): those are refused
        with record_state_writes(model, alias=lambda value: value) as writes, restoring_tensor_attributes(model):
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except ConfigError:
        raise
    except Exception as exc:  # export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        raise export_error(exc, model) from exc
    finally:
        for name, m in model.named_modules():
            m.training = modes.get(name, m.training)
    dropped = [w for w in writes if w.kind != "buffer"]
    if dropped:  # a plain attribute whose old value the program reads is lifted as a constant
        carried, rewritten = split_writes(dropped, set(), {id(v) for v in ep.constants.values()})
        if carried:
            raise assignment_error(carried, "export", model)
        warnings.warn(rewritten_warning(rewritten, "export"), LoraFxWarning, stacklevel=4)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal
        unflat = torch.export.unflatten(ep)
    root = _rebuild(unflat, "", model)
    guard_inputs_(root, input_guards(root.graph, ep.range_constraints))  # the program's guards, checked on each call
    root.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, ep.call_spec.in_spec, ep.call_spec.out_spec))
    root.recompile()
    root.meta[FRONTEND_META] = "export"
    for name, m in root.named_modules():
        m.training = modes.get(name, model.training)
    if check_modes:
        _check_eval(root, model, args, kwargs)
    return root


def _leaves(out) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _check_eval(root: nn.Module, model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Run ``model`` and ``root`` once in eval mode on the example inputs and compare outputs and the
    module state each forward wrote; every buffer and tensor attribute of both is put back to its
    value from before the check (the adapted model starts from the model's state, not one step on)."""
    saved = [(m, m.training) for m in list(model.modules()) + list(root.modules())]
    state = {id(t): (t, t.detach().clone()) for m in (model, root) for t, _ in tensor_versions(m).values()}
    try:
        model.eval()
        root.eval()
        with torch.no_grad():
            want, got = _leaves(model(*args, **kwargs)), _leaves(root(*args, **kwargs))
            written = _state_differences(model, root)
    finally:
        for m, t in saved:
            m.training = t
        with torch.no_grad():
            for t, value in state.values():
                t.copy_(value)
    diffs = [(w - g).abs().max().item() if w.shape == g.shape and w.numel() else (0.0 if w.shape == g.shape else float("inf"))
             for w, g in zip(want, got) if w.is_floating_point()]
    scale = max([w.abs().max().item() for w in want if w.is_floating_point() and w.numel()] + [1.0])
    if len(want) != len(got) or any(d > 1e-4 * scale for d in diffs):
        raise TraceError(
            f"the graph torch.export captured from {type(model).__name__} in train mode differs from the model in "
            f"eval mode (max abs difference {max(diffs, default=float('inf')):.3g} on the example inputs): its forward "
            "branches on self.training in Python beyond dropout, attention dropout and batch norm, which lora_fx makes "
            "follow .train()/.eval(). Use frontend='fx' if the model traces, or remove the branch.")
    if written:
        raise TraceError(
            f"the graph torch.export captured from {type(model).__name__} in train mode writes module state "
            f"differently from the model in eval mode: {written[:8]}. Its forward branches on self.training in "
            "Python around an in-place update or assignment (only batch norm's is made to follow .train()/.eval()). "
            "Use frontend='fx' if the model traces (the module is then kept as a leaf that follows the mode), or "
            "write the update without the branch.")


def _state_differences(model: nn.Module, root: nn.Module) -> list[str]:
    """Names of the buffers and tensor attributes whose values differ between ``model`` and ``root``."""
    mine = {n: t for n, (t, _) in tensor_versions(model).items()}
    out = []
    for name, (t, _) in tensor_versions(root).items():
        w = mine.get(name)
        if w is None or w is t or w.shape != t.shape or w.dtype != t.dtype:
            continue
        if w.is_floating_point():
            same = torch.allclose(w, t, rtol=1e-4, atol=1e-6, equal_nan=True)
        else:
            same = torch.equal(w, t)
        if not same:
            out.append(name)
    return sorted(out)
