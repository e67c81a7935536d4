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
follow ``self.training`` of the ``GraphModule`` holding each op (:func:`follow_mode_`):

* ``aten.dropout`` (and feature / alpha dropout): the ``train`` argument reads ``self.training``;
* ``aten.scaled_dot_product_attention``: ``dropout_p`` becomes ``p if self.training else 0``
  (what ``nn.MultiheadAttention`` and HF attention do in Python);
* ``aten.batch_norm`` with running statistics: ``training`` reads ``self.training``, and the
  ``num_batches_tracked += 1`` update only runs in training.

Other Python branches on ``self.training`` would stay baked in train form, so :func:`capture`
checks the result against the model in eval mode on the example inputs and raises if they differ.

Dynamic shapes: by default every dimension of every example tensor is ``Dim.AUTO`` (sizes seen
as 0 or 1 specialise), so a model captured with a batch of 2 runs with a batch of 8.
"""

from __future__ import annotations

import copy
import inspect
import os
import traceback
import warnings
from typing import Any, Callable, Optional

import torch
from torch import fx, nn
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from lora_fx.errors import ConfigError, TraceError

from .trace import LoraTracer, build_graph_module

__all__ = [
    "FRONTENDS",
    "capture",
    "export_hierarchy",
    "follow_mode_",
    "normalize_example_inputs",
    "default_dynamic_shapes",
    "resolve_dynamic_shapes",
    "train_only",
]

FRONTENDS = ("auto", "fx", "export")

_aten = torch.ops.aten
_DROPOUTS = (_aten.dropout.default, _aten.feature_dropout.default, _aten.alpha_dropout.default,
             _aten.feature_alpha_dropout.default)
_SDPA = _aten.scaled_dot_product_attention.default
_BATCH_NORM = _aten.batch_norm.default


def train_only(p: float, training: bool) -> float:
    """``p`` in training, ``0.0`` in eval: the attention-dropout probability the graph passes to
    ``scaled_dot_product_attention`` (``training`` is the holding module's ``self.training``)."""
    return p if training else 0.0


def add_if_training_(counter: torch.Tensor, training: bool) -> torch.Tensor:
    """``counter += 1`` in training only (batch-norm ``num_batches_tracked``); returns ``counter``."""
    return counter.add_(1) if training else counter


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
# mode-following rewrite


def _training(graph: fx.Graph, cache: dict, before: fx.Node) -> fx.Node:
    node = cache.get("training")
    if node is None:
        first = next(n for n in graph.nodes if n.op != "placeholder") if any(
            n.op != "placeholder" for n in graph.nodes) else before
        with graph.inserting_before(first), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx warns that a bool attribute is not a tensor/module
            node = cache["training"] = graph.get_attr("training")
    return node


def follow_mode_(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm``'s ATen graph (exported in train mode) so dropout, attention dropout and
    batch norm follow ``gm.training``; returns ``gm`` (modified in place)."""
    graph, cache, changed = gm.graph, {}, False
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPOUTS and len(node.args) == 3 and node.args[2] is True:
            node.update_arg(2, _training(graph, cache, node))
            changed = True
        elif node.target is _SDPA:
            p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
            if isinstance(p, (int, float)) and p > 0:
                with graph.inserting_before(node):
                    gated = graph.call_function(train_only, (p, _training(graph, cache, node)))
                if len(node.args) > 4:
                    node.update_arg(4, gated)
                else:
                    node.update_kwarg("dropout_p", gated)
                changed = True
        elif node.target is _BATCH_NORM and len(node.args) > 5 and node.args[5] is True and node.args[3] is not None:
            node.update_arg(5, _training(graph, cache, node))
            changed = True
        elif (node.target is _aten.add_.Tensor and node.args[1] == 1 and isinstance(node.args[0], fx.Node)
              and node.args[0].op == "get_attr" and node.args[0].target.rpartition(".")[2] == "num_batches_tracked"):
            with graph.inserting_before(node):
                new = graph.call_function(add_if_training_, (node.args[0], _training(graph, cache, node)))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return gm


# ------------------------------------------------------------------------------------------------
# unflattened program -> LoraGraphModule hierarchy


def _rebuild(module: nn.Module, path: str, original: nn.Module) -> nn.Module:
    """Replace every InterpreterModule under ``module`` (bottom-up) by a LoraGraphModule."""
    from torch.export.unflatten import InterpreterModule, InterpreterModuleDispatcher

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
    if isinstance(orig, (nn.ModuleList, nn.ModuleDict)):  # containers stay containers (never called)
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


def _user_frame(exc: BaseException):
    """The innermost traceback frame outside torch and lora_fx (the user's line), or None."""
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "lora_fx",
            os.path.dirname(os.path.abspath(__file__)))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith(skip) and "<eval_with_key>" not in f.filename and not f.filename.startswith("<")]
    return frames[-1] if frames else None


def _export_error(exc: BaseException, model: nn.Module) -> TraceError:
    frame = _user_frame(exc)
    where = f" at {frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else ""
    summary = (str(exc).strip().split("\n") or [""])[0][:400]
    return TraceError(
        f"torch.export could not capture {type(model).__name__}{where}: {type(exc).__name__}: {summary}\n"
        "How to fix: make the failing line independent of tensor values (use torch.where / torch.cond "
        "instead of `if tensor:`), or check that example_inputs are what forward expects.")


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
        ``state_dict`` keys equal ``model.state_dict()``'s.  ``meta["lora_fx_frontend"] = "export"``.

    Raises:
        ConfigError: example inputs of the wrong structure.
        TraceError: torch.export failed (names the line and the fix), a module is called more than
            once, or the graph differs from the model in eval mode (Python branches on
            ``self.training`` other than dropout / batch norm / attention dropout).
    """
    args, kwargs, names = normalize_example_inputs(model, example_inputs, example_kwargs)
    shapes = resolve_dynamic_shapes(dynamic_shapes, args, kwargs)
    modes = {name: m.training for name, m in model.named_modules()}
    model.train()
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except ConfigError:
        raise
    except Exception as exc:  # export raises many types (UserError, GuardOnDataDependentSymNode, ...)
        raise _export_error(exc, model) from exc
    finally:
        for name, m in model.named_modules():
            m.training = modes.get(name, m.training)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)  # torch-internal
        unflat = torch.export.unflatten(ep)
    root = _rebuild(unflat, "", model)
    root.graph._codegen = _PyTreeCodeGen(_PyTreeInfo(names, ep.call_spec.in_spec, ep.call_spec.out_spec))
    root.recompile()
    root.meta["lora_fx_frontend"] = "export"
    for name, m in root.named_modules():
        m.training = modes.get(name, model.training)
    if check_modes:
        _check_eval(root, model, args, kwargs)
    return root


def _leaves(out) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _check_eval(root: nn.Module, model: nn.Module, args: tuple, kwargs: dict) -> None:
    saved = [(m, m.training) for m in list(model.modules()) + list(root.modules())]
    try:
        model.eval()
        root.eval()
        with torch.no_grad():
            want, got = _leaves(model(*args, **kwargs)), _leaves(root(*args, **kwargs))
    finally:
        for m, t in saved:
            m.training = t
    diffs = [(w - g).abs().max().item() if w.shape == g.shape and w.numel() else (0.0 if w.shape == g.shape else float("inf"))
             for w, g in zip(want, got) if w.is_floating_point()]
    scale = max([w.abs().max().item() for w in want if w.is_floating_point() and w.numel()] + [1.0])
    if len(want) != len(got) or any(d > 1e-4 * scale for d in diffs):
        raise TraceError(
            f"the graph torch.export captured from {type(model).__name__} in train mode differs from the model in "
            f"eval mode (max abs difference {max(diffs, default=float('inf')):.3g} on the example inputs): its forward "
            "branches on self.training in Python beyond dropout, attention dropout and batch norm, which lora_fx makes "
            "follow .train()/.eval(). Use frontend='fx' if the model traces, or remove the branch.")


# ------------------------------------------------------------------------------------------------
# front-end selection


def _short(exc: BaseException) -> str:
    """A failure without its own "How to fix" (the combined error gives one fix for both)."""
    return str(exc).strip().split("\nHow to fix")[0]


def capture(
    model: nn.Module,
    make_copy: Callable[[], nn.Module],
    *,
    frontend: str,
    example_inputs: Any,
    example_kwargs: Optional[dict],
    dynamic_shapes: Any,
    trace_kwargs: dict,
) -> fx.GraphModule:
    """Capture a private copy of the user's ``model`` with the chosen front-end.

    ``"fx"``: :func:`~lora_fx.passes.trace.trace_hierarchy`; ``"export"``:
    :func:`export_hierarchy`; ``"auto"``: fx, and when fx fails, torch.export if example inputs
    were given.  ``model`` itself is only inspected (its ``forward`` signature); ``make_copy()``
    returns a fresh private copy each call (a failed fx trace may have replaced blocks of its copy).

    Raises:
        ConfigError: unknown ``frontend``, ``frontend="export"`` without example inputs, or
            example inputs of the wrong structure.
        TraceError: the front-end(s) failed; with ``"auto"`` one error shows both failures,
            shortest first, and the fix.
    """
    from .trace import trace_hierarchy

    if frontend not in FRONTENDS:
        raise ConfigError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    has_examples = not (example_inputs is None or (isinstance(example_inputs, tuple) and not example_inputs)) \
        or bool(example_kwargs)
    if frontend == "export" and not has_examples:
        raise ConfigError("frontend='export' needs example inputs: transform(model, ..., frontend='export', "
                          "example_inputs=(x,), example_kwargs={...}) with tensors shaped like real inputs.")
    inputs = () if example_inputs is None else example_inputs
    if frontend != "fx" and has_examples:  # structure errors first, before any work
        normalize_example_inputs(model, inputs, example_kwargs)
    if frontend == "export":
        return export_hierarchy(make_copy(), inputs, example_kwargs, dynamic_shapes=dynamic_shapes)
    try:
        root = trace_hierarchy(make_copy(), **trace_kwargs)
        root.meta["lora_fx_frontend"] = "fx"
        return root
    except TraceError as fx_exc:
        if frontend == "fx":
            raise
        if not has_examples:
            raise TraceError(
                f"{str(fx_exc).strip()}\n(4) or pass example inputs, transform(model, ..., example_inputs=(x,), "
                "example_kwargs={...}): frontend='auto' then falls back to torch.export.") from fx_exc
        fx_error = fx_exc
    try:
        return export_hierarchy(make_copy(), inputs, example_kwargs, dynamic_shapes=dynamic_shapes)
    except TraceError as ex_exc:
        both = sorted([("torch.fx", _short(fx_error)), ("torch.export", _short(ex_exc))], key=lambda t: len(t[1]))
        raise TraceError(
            f"neither front-end could capture {type(model).__name__} (shortest failure first):\n"
            + "\n".join(f"[{which}] {text}" for which, text in both)
            + "\nHow to fix: for torch.fx, pass concrete_args / leaf_modules for the failing module; for "
              "torch.export, make the failing line independent of tensor values (torch.where / torch.cond) and "
              "check example_inputs; or keep the failing code in a leaf module (leaf_modules=[...]).") from ex_exc
