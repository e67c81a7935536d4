"""Deployment: fold the adapters into a copy (:func:`fold`) and export it, with a numeric parity check.

:func:`fold` = :func:`lora_fx.passes.fold.fold_graph_modules` on a copy plus its record in
``meta``.  :func:`export_folded` = :func:`fold` on a copy → ``torch.export.export`` → optional
``.pt2`` file (``torch.export.save``, written atomically) → parity of the exported program
against the eager adapted model on the example inputs.  :func:`export_onnx` does the same through
``torch.onnx.export(..., dynamo=True)`` and checks parity with onnxruntime.

The live adapted model is never modified: it keeps its adapters, parameters, modes and outputs
whether the export succeeds or fails at any step.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from lora_fx.passes.fold import fold_graph_modules, fold_regions
from lora_fx.passes.trace_export import export_error, normalize_example_inputs, resolve_dynamic_shapes

from .hf_quantization import after_fold_
from .errors import ExportFileError, ExportParityError
from .io._files import atomic_write
from .state import BUFFERS_ATTR, CONFIG_ATTR, FOLD_ATTR, FOLD_META, LEFT_OUT_ATTR, TRAINABLE_ATTR, require_adapted

__all__ = ["fold", "export_folded", "export_onnx", "parity_report"]


def fold(gm: nn.Module, *, requantize: bool = False, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A new module with every adapter folded into its weight as it contributes now (in the active
    set and switched on, at its mixing weight; others add nothing): ``W ← W + ΔW`` computed in
    float32 (or wider) and rounded once to ``W``'s dtype; no adapter nodes or parameters remain.

    A model that kept its class (the regions front-end: a Hugging Face model, say) folds into an
    instance of that class made of its own plain modules (no region, no instance ``forward``, no
    ``lora`` submodule), whose ``save_pretrained`` / ``from_pretrained`` round-trips; it carries no
    ``meta`` record.

    ``fold(gm).state_dict()`` has the original model's keys, so it loads with ``strict=True`` into
    a fresh instance of the original class.  ``gm`` is not modified.  ``result.meta["lora_fx"]``
    (:data:`lora_fx.state.FOLD_META`) holds ``{"folded": [names], "untied": [names]}``: a weight
    tied to an unadapted alias gets its own folded tensor and is listed under ``"untied"``.

    A quantized base weight (torchao, bitsandbytes) folds by default into a plain float weight
    ``dequantize(W_q) + ΔW`` of its compute dtype (fp32 accumulation, one rounding): the folded
    layer computes the adapted function exactly, in float.  bitsandbytes linears holding such a
    weight become ``nn.Linear`` s (bias in the weight's dtype), or transformers ``Conv1D`` s (GPT-2)
    when transformers made them from one; torchao weights stay in their ``nn.Linear``.  Layers that
    were not adapted keep their quantized weights.  A Hugging Face model with no quantized weight
    left loses transformers' quantization record (``config.quantization_config``, ``hf_quantizer``),
    so its ``save_pretrained`` is a float checkpoint; one still partly quantized lists the layers
    folded to float among its config's skipped modules, so ``from_pretrained`` loads them as float
    layers (:mod:`lora_fx.hf_quantization`).

    Args:
        gm: a module from :func:`lora_fx.transform`.
        requantize: quantize each folded quantized weight again, in the scheme of the base (same
            block size, data type, statistics layout; bitsandbytes modules stay bitsandbytes
            modules).  As lossy as quantizing afresh: the entry :data:`lora_fx.state.REQUANT_ERROR`
            of ``result.meta["lora_fx"]`` (of ``result.lora_fx_fold`` for a model that kept its
            class, :data:`lora_fx.state.FOLD_ATTR`) records, per weight, the largest and mean
            absolute difference ``{"max", "mean"}`` between the requantized weight and the float fold.
        dtype: the dtype of the float weights folded from quantized ones (default: each weight's
            compute dtype; bitsandbytes 8-bit weights keep no record of theirs and take the
            floating dtype of most of the model's plain parameters, float16 when it has none).  Plain weights always keep their dtype.

    Raises:
        NotAdaptedError: ``gm`` was not produced by :func:`lora_fx.transform` (or is already folded).
        NonFiniteError: a folded weight is not finite (a diverged adapter), naming the weight.
    """
    require_adapted(gm, "fold", detail=" (already folded, or never transformed), so there is nothing to fold")
    if not isinstance(gm, fx.GraphModule):  # a model that kept its class: the plain model back
        folded, info = fold_regions(gm, requantize=bool(requantize), dtype=dtype)
        folded.__dict__[FOLD_ATTR] = info  # no .meta on a plain module: one attribute
        return after_fold_(folded, info["folded"])
    folded, info = fold_graph_modules(gm, requantize=bool(requantize), dtype=dtype)
    for attr in (CONFIG_ATTR, TRAINABLE_ATTR, BUFFERS_ATTR, LEFT_OUT_ATTR):  # parameters trained in full stay
        if hasattr(folded, attr):
            delattr(folded, attr)
    folded.meta[FOLD_META] = info
    return folded



_PARITY_FIX = ("The model's forward depends on something export bakes in (Python state, a global, randomness, a "
               "shape-dependent branch): make it a tensor input or buffer, or export with example inputs like the "
               "ones you check with.")


def _tolerance(t: torch.Tensor) -> tuple[float, float]:
    if t.dtype in (torch.float16, torch.bfloat16):
        return 2e-2, 2e-2
    return 1e-4, 1e-5


def parity_report(want: Any, got: Any, *, what: str, rtol: Optional[float] = None,
                  atol: Optional[float] = None) -> float:
    """Compare two output pytrees leaf by leaf; returns the largest absolute difference.

    A leaf passes when ``|got - want| <= atol·max(1, max|want|) + rtol·|want|`` (defaults per
    dtype: fp32/fp64 ``rtol=1e-4, atol=1e-5``; fp16/bf16 ``2e-2``); integer leaves must be equal.

    Raises:
        ExportParityError: different structure, shape, or a leaf out of tolerance, naming the leaf
            index and the largest difference.
    """
    w_leaves = [x for x in pytree.tree_leaves(want) if isinstance(x, torch.Tensor)]
    g_leaves = [torch.as_tensor(x) for x in pytree.tree_leaves(got) if isinstance(x, (torch.Tensor,)) or hasattr(x, "shape")]
    if len(w_leaves) != len(g_leaves):
        raise ExportParityError(f"{what}: {len(g_leaves)} output tensors, the eager adapted model returns {len(w_leaves)}. "
                                f"{_PARITY_FIX}")
    worst = 0.0
    for i, (w, g) in enumerate(zip(w_leaves, g_leaves)):
        g = g.to(w.device)
        if tuple(w.shape) != tuple(g.shape):
            raise ExportParityError(f"{what}: output {i} has shape {tuple(g.shape)}, eager has {tuple(w.shape)}. "
                                    f"{_PARITY_FIX}")
        if not w.is_floating_point():
            if not torch.equal(w, g.to(w.dtype)):
                raise ExportParityError(f"{what}: integer output {i} differs from eager. {_PARITY_FIX}")
            continue
        r, a = _tolerance(w)
        r, a = rtol if rtol is not None else r, atol if atol is not None else a
        wf, gf = w.detach().double(), g.detach().double()
        diff = (wf - gf).abs()
        d = diff.max().item() if diff.numel() else 0.0
        worst = max(worst, d)
        scale = max(1.0, wf.abs().max().item() if wf.numel() else 1.0)
        if not bool((diff <= a * scale + r * wf.abs()).all()):
            raise ExportParityError(
                f"{what}: output {i} {tuple(w.shape)} differs from the eager adapted model by up to {d:.3g} "
                f"(tolerance atol={a:g}·{scale:.3g} + rtol={r:g}·|eager|). The model's forward depends on something "
                "export bakes in (Python state, a global, randomness): make it a tensor input or buffer, or "
                "loosen rtol/atol if the difference is rounding.")
    return worst


def _snapshot_modes(m: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(sub, sub.training) for sub in m.modules()]


def _restore_modes(saved) -> None:
    for sub, t in saved:
        sub.training = t


def _reference(gm: nn.Module, args: tuple, kwargs: dict, eval_mode: bool):
    saved = _snapshot_modes(gm)
    try:
        if eval_mode:
            gm.eval()
        with torch.no_grad():
            return gm(*args, **kwargs)
    finally:
        _restore_modes(saved)


def _prepare(gm: nn.Module, example_inputs, example_kwargs, eval_mode: bool):
    require_adapted(gm, "export_folded", detail=" (export a plain model with torch.export.export directly)")
    args, kwargs, _ = normalize_example_inputs(gm, example_inputs, example_kwargs)
    want = _reference(gm, args, kwargs, eval_mode)
    folded = fold(gm)  # a new module; gm is not touched
    if eval_mode:
        folded.eval()
    return folded, args, kwargs, want


def _atomic_write(path: str, write) -> None:
    """:func:`lora_fx.io._files.atomic_write`, with its ``OSError`` reported as :class:`ExportFileError`."""
    try:
        atomic_write(path, write)
    except OSError as exc:
        raise ExportFileError(f"cannot write the exported program to '{os.fspath(path)}': {exc}. Choose a writable "
                              "path (the adapted model was not changed).") from exc


def export_folded(
    gm: nn.Module,
    example_inputs: Any,
    *,
    example_kwargs: Optional[dict] = None,
    path: Optional[str] = None,
    dynamic_shapes: Any = None,
    eval_mode: bool = True,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
) -> torch.export.ExportedProgram:
    """Fold ``gm``'s adapters into a copy, ``torch.export.export`` it, check numeric parity
    against the eager adapted ``gm`` and optionally save it (``torch.export.save``).

    Args:
        gm: a module from :func:`lora_fx.transform` (either front-end).
        example_inputs: tuple of positional arguments (a single tensor is wrapped); also the
            parity-check inputs.
        example_kwargs: keyword arguments.
        path: where to write the ``.pt2`` file (atomically: a temporary file is renamed).
        dynamic_shapes: as ``torch.export.export``'s; default ``Dim.AUTO`` for every dimension;
            ``False``: static shapes (exports faster; the program then takes the example sizes only).
        eval_mode: export (and compare) the model in eval mode (default); False keeps each
            module's current mode (dropout then makes parity meaningless).
        rtol, atol: parity tolerances (see :func:`parity_report`).

    Returns:
        the ``torch.export.ExportedProgram`` of the folded model: the original model's parameter
        names, no adapter parameters, no lora_fx ops.

    Raises:
        NotAdaptedError: ``gm`` carries no adapters.
        ConfigError: example inputs of the wrong structure.
        TraceError: ``torch.export`` failed on the folded model.
        ExportParityError: the exported program's outputs differ from the eager adapted model's.
        ExportFileError: ``path`` cannot be written.

    ``gm`` keeps its adapters, parameters, modes and outputs in every case.
    """
    folded, args, kwargs, want = _prepare(gm, example_inputs, example_kwargs, eval_mode)
    shapes = resolve_dynamic_shapes(dynamic_shapes, args, kwargs)
    try:
        ep = torch.export.export(folded, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as exc:
        raise export_error(exc, folded) from exc
    with torch.no_grad():
        got = ep.module()(*args, **kwargs)
    parity_report(want, got, what="torch.export of the folded model", rtol=rtol, atol=atol)
    if path is not None:
        _atomic_write(path, lambda tmp: torch.export.save(ep, tmp))
    return ep


def export_onnx(
    gm: nn.Module,
    example_inputs: Any,
    path: str,
    *,
    example_kwargs: Optional[dict] = None,
    dynamic_shapes: Any = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
):
    """Fold ``gm`` into a copy, export it to ONNX with ``torch.onnx.export(..., dynamo=True)``,
    write ``path`` atomically and check parity with onnxruntime on the example inputs (eval mode).

    Needs the ``onnx`` extra (``onnx``, ``onnxscript``, ``onnxruntime``).  Weights are stored
    inside the file (no external data), so the model must stay under ONNX's 2 GB limit.

    Returns:
        the ``torch.onnx.ONNXProgram``.

    Raises:
        NotAdaptedError, ConfigError, TraceError, ExportFileError: as :func:`export_folded`.
        ExportParityError: onnxruntime's outputs differ from the eager adapted model's.
        ImportError: onnxruntime / onnxscript missing (install ``lora_fx[onnx]``).
    """
    import onnxruntime as ort  # noqa: F401  (fail early with ImportError)

    folded, args, kwargs, want = _prepare(gm, example_inputs, None if example_kwargs is None else example_kwargs, True)
    shapes = resolve_dynamic_shapes(dynamic_shapes, args, kwargs)
    try:
        ep = torch.export.export(folded, args, kwargs, dynamic_shapes=shapes, strict=False)
        program = torch.onnx.export(ep, args, kwargs=kwargs, dynamo=True, external_data=False, verbose=False)
    except Exception as exc:
        raise export_error(exc, folded) from exc
    flat = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    _atomic_write(path, lambda tmp: program.save(tmp, external_data=False))
    session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), flat)}
    got = [torch.from_numpy(o) for o in session.run(None, feeds)]
    parity_report(want, got, what="onnxruntime on the folded ONNX model", rtol=rtol, atol=atol)
    return program
