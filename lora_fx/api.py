"""The public entry point :func:`transform`: it only orchestrates the pipeline, each step in its own file.

1. options → one :class:`~lora_fx.config.LoraConfig` (:mod:`lora_fx.config`); the adapter name
   (:mod:`lora_fx.targets`);
2. capture a private copy of the model as a hierarchy of ``GraphModule`` s
   (:mod:`lora_fx.passes.capture`: torch.fx :mod:`~lora_fx.passes.trace_fx`, or torch.export
   :mod:`~lora_fx.passes.trace_export` + :mod:`~lora_fx.passes.follow_mode`);
3. :func:`lora_fx.adapters.lifecycle.adapt_`: find sites (:mod:`lora_fx.passes.find_sites`) →
   select targets (:mod:`lora_fx.targets`) → make adapters (:mod:`lora_fx.adapters.init`) →
   insert them (:mod:`lora_fx.passes.insert_lora`, lowering per :mod:`lora_fx.rules`) → record
   state (:mod:`lora_fx.state`);
4. only the adapters train (:mod:`lora_fx.adapters.trainable`).

:func:`fold` (:mod:`lora_fx.deploy`) and :func:`sites` / :class:`Site` (:mod:`lora_fx.state`) are
re-exported here.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import fx, nn

from lora_fx.passes.capture import capture, private_copy

from .adapters.lifecycle import adapt_
from .adapters.trainable import train_adapters_only_
from .config import CONFIG_KEYS, UNSET, LoraConfig, as_patterns, config_with, unknown_keywords_message
from .deploy import fold
from .errors import AlreadyAdaptedError, ConfigError
from .adapter_methods import install_adapter_api_
from .graph_module import deferred_recompile
from .hf_quantization import mark_adapted_
from .producers import install_producer_tags_
from .buffers import record_buffers_
from .state import CONFIG_ATTR, OWNS_WEIGHTS_ATTR, POLICY_ATTR, is_adapted, trainable_params
from .site_view import Site, sites
from .targets import check_adapter_name, target_policy

__all__ = ["transform", "fold", "sites", "Site", "CONFIG_ATTR", "OWNS_WEIGHTS_ATTR"]

_UNSET = UNSET  # its old name here (pickles of the sentinel refer to it)
_CAPTURE_KEYS = ("config", "adapter_name", "blocks", "leaf_modules", "concrete_args", "copy_weights", "frontend",
                 "example_inputs", "example_kwargs", "dynamic_shapes")


def transform(
    model: nn.Module,
    rank: int = UNSET,
    *,
    alpha: Optional[float] = UNSET,
    targets: Union[None, str, Sequence[str]] = UNSET,
    exclude: Union[None, str, Sequence[str]] = UNSET,
    rank_pattern: Optional[dict] = UNSET,
    alpha_pattern: Optional[dict] = UNSET,
    use_rslora: bool = UNSET,
    use_dora: bool = UNSET,
    init: str = UNSET,
    dropout: float = UNSET,
    lowering: str = UNSET,
    recompute_inputs: bool = UNSET,
    adapter_dtype: Optional[str] = UNSET,
    fused: Optional[dict] = UNSET,
    trainable: Union[None, str, Sequence[str]] = UNSET,
    config: Optional[LoraConfig] = None,
    adapter_name: str = "default",
    blocks: Union[None, str, Sequence[str]] = None,
    leaf_modules: Union[None, str, Sequence[str]] = None,
    concrete_args: Optional[dict[str, Any]] = None,
    copy_weights: bool = True,
    frontend: str = "auto",
    example_inputs: Any = None,
    example_kwargs: Optional[dict[str, Any]] = None,
    dynamic_shapes: Any = None,
    **unknown: Any,
) -> nn.Module:
    """Capture a copy of ``model`` and return it with every targeted weight ``W`` seen by its op as
    ``W + ΔW``, ``ΔW = scaling · (lora_B @ lora_A).reshape(W.shape)``
    (Hu et al., 2022, eq. 3), ``scaling = alpha / rank``.

    ``lora_A: (rank, W[0].numel())`` starts kaiming-uniform, ``lora_B: (W.shape[0], rank)`` starts
    at zero, so the result computes exactly what ``model`` computes until trained.  Only the
    adapters are trainable; base parameters are frozen copies (``copy_weights=False`` shares their
    storage instead, to save memory).  ``model`` is never modified.

    Args:
        model: any ``nn.Module``: one torch.fx traces whole (blocks in ``nn.ModuleList`` s are
            traced one by one and stay called submodules) becomes a ``GraphModule``; any other
            (a Hugging Face model, with its cache logic and ``**kwargs`` forwards) keeps its class,
            its capturable modules becoming regions (see ``frontend``).
        rank: ``r > 0`` (default 16).  A rank above ``min(fan_out, fan_in)`` of a targeted weight
            is allowed (the update is then full-rank) and warns with :class:`LoraFxWarning`.
        alpha: ``> 0``; default ``rank`` (scaling 1.0).
        targets: fnmatch patterns over fully qualified parameter names, e.g.
            ``"layers.*.attn.*.weight"``; ``None``: every weight of linear, conv, conv-transpose,
            embedding, matmul and attention sites.
        exclude: patterns removed from targets (exclude wins).
        rank_pattern, alpha_pattern, use_rslora, use_dora, init, dropout, lowering, recompute_inputs,
            adapter_dtype: see
            :class:`~lora_fx.config.LoraConfig` (these keywords override ``config``).
        fused: ``{pattern: spec}``: per-block adapters on weights whose output rows are blocks,
            e.g. ``{"*.qkv.weight": {"blocks": {"q": 64, "k": 16, "v": 16}, "enable": ("q", "v")}}``
            (see :mod:`lora_fx.fused`; MHA ``in_proj_weight`` is q, k, v blocks by default).
        trainable: patterns over module or parameter names (``"score"``, ``"classifier.*"``)
            whose base parameters train in full with the adapter (PEFT's ``modules_to_save``):
            unfrozen in the copy (with ``copy_weights=False`` they get their own copy, so your
            model never changes), no adapter on them, saved with the adapter, kept by ``fold``.
        config: a :class:`~lora_fx.config.LoraConfig`.
        adapter_name: name of the adapter (``"default"``); add more with
            :func:`lora_fx.adapters.add_adapter`.
        blocks: patterns of extra modules to keep as separately traced, called submodules.
        leaf_modules: patterns of modules to keep opaque (not traced through).
        concrete_args: as in ``torch.fx.symbolic_trace``.
        copy_weights: copy base weights (default) or share their storage with ``model``
            (``init="pissa"`` needs the copy: it writes its residual into the module's own ``W``).
        frontend: ``"auto"`` (torch.fx symbolic tracing of the whole model; when it fails,
            ``torch.export`` if example inputs are given, else ``"regions"``), ``"fx"``,
            ``"export"`` or ``"regions"``: the model keeps its class and every module torch.fx can
            capture on its own (a forward of required positional arguments) becomes a region
            rewritten like a graph, the rest running as the model's own Python
            (:mod:`lora_fx.passes.trace_regions`; see :mod:`lora_fx.passes.capture`).
        example_inputs: tuple of positional example arguments for the export front-end (a single
            tensor is wrapped); sizes are dynamic unless ``dynamic_shapes`` says otherwise.
        example_kwargs: keyword example arguments for the export front-end.
        dynamic_shapes: as ``torch.export.export``'s (default: ``Dim.AUTO`` for every dimension;
            ``False``: static, the result then only runs on the example sizes).

    Returns:
        a ``torch.fx.GraphModule`` (fx, export), or an instance of ``model``'s own class
        (regions), whose ``state_dict()`` has ``model``'s keys and values plus
        ``*.lora.<adapter_name>.<param>.lora_A`` / ``.lora_B``; :func:`lora_fx.state.frontend_of`
        says which front-end captured it.

    Raises:
        ConfigError: invalid rank, alpha, dropout, lowering, ... or an unknown keyword.
        TargetError: a targets/exclude pattern matches nothing (the message lists candidates).
        UnsupportedSiteError: ``targets`` names a parameter that cannot be adapted.
        AlreadyAdaptedError: ``model`` already carries lora_fx adapters (use ``add_adapter``).
        TraceError: the front-end cannot capture the model (names the module, line and the
            fixes; with ``frontend="auto"`` both failures, shortest first).
    """
    if unknown:
        raise ConfigError(unknown_keywords_message("transform()", unknown, CONFIG_KEYS + _CAPTURE_KEYS))
    # 1. the options: one LoraConfig (config.py), a valid adapter name (targets.py), an unadapted model
    check_adapter_name(adapter_name)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"transform() needs an nn.Module, got {type(model).__name__}")
    cfg = config_with(config, rank=rank, alpha=alpha, targets=targets, exclude=exclude, rank_pattern=rank_pattern,
                      alpha_pattern=alpha_pattern, use_rslora=use_rslora, use_dora=use_dora, init=init,
                      dropout=dropout, lowering=lowering, recompute_inputs=recompute_inputs,
                      adapter_dtype=adapter_dtype, fused=fused, trainable=trainable)
    if is_adapted(model):
        raise AlreadyAdaptedError(
            f"{type(model).__name__} already carries lora_fx adapters; transforming it again would stack a "
            "second adapter silently. Train it as is, call lora_fx.fold(model) first, or add a named adapter "
            "with lora_fx.add_adapter(model, name, ...).")
    with deferred_recompile():  # each GraphModule generates its code once, after the rewrite
        # 2. capture a private copy: torch.fx or torch.export (passes/capture.py → trace_fx, trace_export)
        root = capture(model, lambda: private_copy(model, copy_weights), frontend=frontend,
                       example_inputs=example_inputs, example_kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
                       trace_kwargs=dict(blocks=as_patterns(blocks, "blocks") or (),
                                         leaf_modules=as_patterns(leaf_modules, "leaf_modules") or (),
                                         concrete_args=concrete_args))
        setattr(root, OWNS_WEIGHTS_ATTR, bool(copy_weights))
        mark_adapted_(root)  # a quantized transformers model with adapters: Trainer may train it
        setattr(root, POLICY_ATTR, target_policy(model))  # what only the user's model shows (targets.py)
        record_buffers_(root, model)  # to tell later which buffers training changed (io)
        # 3. find sites → select targets → make adapters → insert_lora → record state (adapters/lifecycle.adapt_)
        adapt_(root, cfg, adapter_name)
        if cfg.recompute_inputs and not isinstance(root, fx.GraphModule):  # kept class: norms the model's code calls
            install_producer_tags_(root)
        if not isinstance(root, fx.GraphModule):  # kept class: transformers' adapter methods act on lora_fx's
            install_adapter_api_(root)
        if not copy_weights:  # trained in full: the copy's own storage, never the user's
            for name in trainable_params(root):
                p = root.get_parameter(name)
                p.data = p.detach().clone()
        # 4. only the adapters (and trainable= parameters) train (adapters/trainable.py)
        return train_adapters_only_(root)
