"""Front-end selection: capture a private copy of the user's model as a lora_fx ``GraphModule``
hierarchy with torch.fx (:mod:`.trace_fx`) or torch.export (:mod:`.trace_export`), or as the model
itself with its capturable modules turned into regions (:mod:`.trace_regions`)."""

from __future__ import annotations

import collections
import copy
import warnings
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from lora_fx import weights
from lora_fx.errors import ConfigError, TraceError
from lora_fx.graph_module import compile_stale
from lora_fx.state import KEPT_ATTR, record_frontend_

from .trace_export import export_hierarchy, normalize_example_inputs
from .trace_fx import trace_hierarchy
from .capture_stacks import capture_stacks_
from .trace_regions import capture_regions

__all__ = ["FRONTENDS", "capture", "private_copy"]

FRONTENDS = ("auto", "fx", "export", "regions")


def private_copy(model: nn.Module, copy_weights: bool) -> nn.Module:
    """A deep copy of the user's ``model`` for the front-end to capture (lora_fx never modifies
    ``model``).  ``copy_weights=False`` shares the parameters' storage (one new ``Parameter`` per
    parameter object, so ties stay ties).

    Raises:
        ConfigError: ``model`` cannot be deep-copied (names what to drop).
    """
    memo: dict[int, Any] = {}
    for m in model.modules():  # every module's empty hook dicts and sets: made here, not via __reduce_ex__
        for v in m.__dict__.values():
            if (type(v) is collections.OrderedDict and not v and not v.__dict__) or (type(v) is set and not v):
                memo[id(v)] = type(v)()
            elif isinstance(v, torch.Tensor) and v.grad_fn is not None:
                # a tensor attribute computed with autograd (the weight the deprecated
                # torch.nn.utils.weight_norm hook recomputes before every forward): deepcopy refuses
                # non-leaf tensors, so the copy holds its detached value
                memo[id(v)] = v.detach().clone()
    if not copy_weights:
        for p in model.parameters():  # each Parameter object once; ties map to one copy
            memo[id(p)] = weights.share(p)  # the same storage (a quantized kind keeps its type)
    try:
        copied = copy.deepcopy(model, memo)
    except Exception as exc:
        culprit = _uncopyable(model)
        where = (f": module '{culprit[0] or '<root>'}' ({culprit[1]}) holds {culprit[2]!r}, a {culprit[3]} that "
                 f"cannot be copied ({culprit[4]})" if culprit else f": {type(exc).__name__}: {exc}")
        raise ConfigError(
            f"could not copy {type(model).__name__} (lora_fx never modifies your model, so it works on a "
            f"copy){where}. Make it deep-copyable: delete that attribute before transform (or set it again on the "
            "result), or give its type a __deepcopy__.") from exc
    compile_stale(copied)  # GraphModules in the model: copied inside transform's deferred_recompile block
    return copied


def _uncopyable(model: nn.Module):
    """``(module path, class, attribute, type, error)`` of the first module attribute (or hook) of
    ``model`` that ``copy.deepcopy`` refuses, or None."""
    for path, m in model.named_modules():
        for key, value in vars(m).items():
            if key == "_modules":
                continue
            items = value.items() if isinstance(value, dict) and key.startswith("_") else [(key, value)]
            for name, v in items:
                try:
                    copy.deepcopy(v)
                except Exception as exc:
                    label = name if name == key else f"{key}[{name!r}]"
                    return path, type(m).__name__, label, type(v).__name__, f"{type(exc).__name__}: {exc}"
    return None


def _show(caught) -> None:
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _short(exc: BaseException) -> str:
    """A failure without its own "How to fix" (the combined error gives one fix for both)."""
    return str(exc).strip().split("\nHow to fix")[0]


#: attribute names a torch.fx GraphModule holds itself (``graph``, ``code``, ``meta``, ``recompile``, ...):
#: a submodule registered under one of them cannot be copied into a graph module
_RESERVED = frozenset({n for n in dir(fx.GraphModule) if not hasattr(nn.Module, n)} | {"meta", "_graph", "_code"})


def _check_child_names(model: nn.Module) -> None:
    """Raise :class:`TraceError` for submodules whose names a torch.fx GraphModule reserves."""
    bad = [path for path, _ in model.named_modules() if path and path.rpartition(".")[2] in _RESERVED]
    if bad:
        raise TraceError(
            f"submodule(s) {bad[:6]} of {type(model).__name__} are named like attributes a torch.fx GraphModule "
            f"holds itself ({sorted({p.rpartition('.')[2] for p in bad})}), so no front-end can capture the model "
            "(torch.fx.symbolic_trace fails the same way). Rename the attribute in the model (e.g. "
            "self.meta_net instead of self.meta); the model was not changed.")


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

    ``"fx"``: :func:`~lora_fx.passes.trace_fx.trace_hierarchy`; ``"export"``:
    :func:`export_hierarchy`; ``"regions"``: :func:`~lora_fx.passes.trace_regions.capture_regions`
    (the copy keeps its class); ``"auto"``: fx on the whole model, and when fx fails, torch.export
    if example inputs were given, else the regions front-end.  ``model`` itself is only inspected
    (its ``forward`` signature); ``make_copy()`` returns a fresh private copy each call (a failed fx
    trace may have replaced blocks of its copy).

    Returns:
        a ``GraphModule`` (fx, export) or the copy itself (regions); the front-end is recorded on it
        (:func:`lora_fx.state.frontend_of`).

    Raises:
        ConfigError: unknown ``frontend``, ``frontend="export"`` without example inputs, or
            example inputs of the wrong structure.
        TraceError: the front-end(s) failed; with ``"auto"`` one error shows both failures,
            shortest first, and the fix; the regions front-end captured no module with weights.
    """
    if frontend not in FRONTENDS:
        raise ConfigError(f"frontend must be one of {FRONTENDS}, got {frontend!r}")
    _check_child_names(model)
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
    if frontend == "regions":
        return _regions(make_copy(), trace_kwargs, None)
    copied = make_copy()
    try:
        with warnings.catch_warnings(record=True) as caught:  # shown only if fx is the front-end used
            warnings.simplefilter("always")
            root = trace_hierarchy(copied, **trace_kwargs)
    except TraceError as fx_exc:
        if frontend == "fx":
            _show(caught)
            raise
        if not has_examples:  # the same copy unless the failed trace replaced blocks in it
            reuse = not any(isinstance(m, fx.GraphModule) for m in copied.modules())
            return _regions(copied if reuse else make_copy(), trace_kwargs, fx_exc)
        fx_error = fx_exc
    else:
        _show(caught)
        return record_frontend_(root, "fx")
    try:
        return export_hierarchy(make_copy(), inputs, example_kwargs, dynamic_shapes=dynamic_shapes)
    except TraceError as ex_exc:
        both = sorted([("torch.fx", _short(fx_error)), ("torch.export", _short(ex_exc))], key=lambda t: len(t[1]))
        raise TraceError(
            f"neither front-end could capture {type(model).__name__} (shortest failure first):\n"
            + "\n".join(f"[{which}] {text}" for which, text in both)
            + "\nHow to fix: " + _combined_fix(fx_error, ex_exc)) from ex_exc


def _combined_fix(fx_error: TraceError, export_error: TraceError) -> str:
    """The fix when both front-ends failed: the torch.export failure's own fix, and a leaf for the
    module torch.fx failed in (a child; the root cannot be a leaf of its own trace)."""
    path = getattr(fx_error, "module_path", "")
    fx_fix = (f"for torch.fx, keep '{path}' opaque with leaf_modules=['{path}'] (or pass concrete_args for the "
              "arguments it branches on)" if path else
              "for torch.fx, pass concrete_args for the arguments the root's forward branches on, or move the "
              "failing lines into a submodule and keep it opaque with leaf_modules=['<its name>']")
    ex_fix = str(export_error).split("How to fix: ")[-1].strip().rstrip(".")
    return (f"{fx_fix}; for torch.export: {ex_fix}; or transform without example_inputs (frontend='regions'), "
            "which keeps the modules torch.fx cannot trace as their own Python and captures the ones it can.")


def _regions(root: nn.Module, trace_kwargs: dict, fx_error: Optional[TraceError]) -> nn.Module:
    """The regions front-end on ``root``; a TraceError when it captured nothing (with ``"auto"``:
    torch.fx's own failure, and the export fallback)."""
    found = capture_regions(root, blocks=trace_kwargs.get("blocks", ()),
                            leaf_modules=trace_kwargs.get("leaf_modules", ()),
                            concrete_args=trace_kwargs.get("concrete_args"))
    found += capture_stacks_(root)  # kept modules reading their own expert stacks: weights regions
    if found:
        return record_frontend_(root, "regions")
    why = root.__dict__.get(KEPT_ATTR) or "it has no adaptable weight"
    if fx_error is not None:
        raise TraceError(
            f"{str(fx_error).strip()}\n(4) or pass example inputs, transform(model, ..., example_inputs=(x,), "
            "example_kwargs={...}): frontend='auto' then falls back to torch.export. (Capturing its modules one by "
            f"one found no module with weights torch.fx can trace: {type(root).__name__} {why}.)") from fx_error
    raise TraceError(
        f"frontend='regions' found no module of {type(root).__name__} with weights that torch.fx can trace "
        f"({type(root).__name__}: {why}). A module is captured when its forward takes only required positional "
        "arguments and traces; use frontend='export' with example_inputs for the rest.")
