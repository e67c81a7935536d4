"""Modules that keep their class: the instance ``forward`` through which a region's graph runs.

The regions front-end (:mod:`lora_fx.passes.trace_regions`) leaves every module of the model an
instance of its own class.  A module whose ``forward`` torch.fx captured is a *region*: its
rewritten graph lives in a ``GraphModule`` kept in ``module.__dict__`` (key
:data:`~lora_fx.state.REGION_ATTR`, outside ``_modules``, so ``state_dict``, ``named_modules`` and
hooks are the model's own), and ``module.forward`` is set to a :class:`RegionForward`, which runs
the graph's generated code with ``self`` bound to the module itself.  ``module(x)`` therefore goes
through ``nn.Module.__call__`` (hooks, FSDP2, checkpointing) into the rewritten graph, and
``self.weight`` or ``self.lora...`` in that code read the live module.

:class:`~lora_fx.instance_forward.InstanceForward` is the base of every ``forward`` lora_fx sets
on an instance (this one; a class forward called with expert stacks substituted; a norm's producer
tag): :func:`strip_regions_` removes them all.  :meth:`RegionForward.select` is where a variant of a
region's code (an inference form, say) can plug in.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import fx, nn

from .graph_module import CODE_VERSION_ATTR
from .instance_forward import InstanceForward
from .producers import PARKED_ATTR
from .state import (ADAPTER_ATTR, CONFIG_ATTR, FRONTEND_ATTR, INFERENCE_ATTR, KEPT_ATTR, LEFT_OUT_ATTR,
                    OWNS_WEIGHTS_ATTR, POLICY_ATTR, REGION_ATTR, region_of)

__all__ = ["InstanceForward", "RegionForward", "install_region_", "unregistered_holder", "set_unregistered_holder_",
           "strip_regions_"]

_FORWARD = "forward"


class RegionForward(InstanceForward):
    """``module.forward`` of a region: the generated code of ``module.__dict__[REGION_ATTR]`` (a
    ``LoraGraphModule``), called with ``self = module``.

    The code is looked up from the region on each call and cached while the region's
    ``code_version`` (bumped by every ``recompile``: add or delete an adapter) is unchanged; a
    stale region (rewritten inside ``deferred_recompile``) is compiled on first use.  Under
    ``torch.compile`` the cache is bypassed (Dynamo would guard on it): the code is traced directly.
    """

    def __init__(self, module: nn.Module):
        super().__init__(module)
        self._gm = None
        self._version = -1
        self._code: Callable[..., Any] | None = None
        self._infer: Any = None  # the inference cache's variant of this region (see lora_fx.inference)

    def __call__(self, *args, **kwargs):
        module = self.__self__
        gm = module.__dict__[REGION_ATTR]
        if torch.compiler.is_compiling():  # no cache to guard on: the code itself is traced
            return self.select(gm)(module, *args, **kwargs)
        if gm is not self._gm or gm.__dict__.get(CODE_VERSION_ATTR, 0) != self._version:  # gm.code_version, inlined
            self._refresh(gm)
        infer = self._infer
        if infer is not None and not torch.is_grad_enabled() and (infer.check is None or infer.check()):
            if kwargs:
                return infer.code(module, *args, _lora_fx_cache=infer.slots, **kwargs)
            return infer.code(module, *args, infer.slots)
        return self._code(module, *args, **kwargs)

    def _refresh(self, gm: fx.GraphModule) -> None:
        if gm._lora_fx_stale():
            gm._lora_fx_compile()
        self._gm, self._version, self._code = gm, gm.code_version, self.select(gm)
        cache = self.__self__.__dict__.get(INFERENCE_ATTR)
        self._release()
        self._infer = None if cache is None else cache.variant(self.__self__, gm)

    def invalidate(self) -> None:
        """Look the region's code (and its inference variant) up again on the next call."""
        self._release()
        self._gm, self._version, self._code, self._infer = None, -1, None, None

    def _release(self) -> None:
        if self._infer is not None:  # its merged weights go now, not when a reference cycle is collected
            self._infer.release()

    def select(self, gm: fx.GraphModule) -> Callable[..., Any]:
        """The function run as the module's forward, ``fn(module, *args, **kwargs)``: the region's
        generated code.  Called once per code version; the seam for a variant of that code."""
        return type(gm).forward


def install_region_(module: nn.Module, gm: fx.GraphModule) -> nn.Module:
    """Make ``gm`` (built over ``module``'s own tables) the region of ``module`` and its code the
    module's ``forward``; returns ``module``."""
    module.__dict__[REGION_ATTR] = gm
    module.__dict__[_FORWARD] = RegionForward(module)
    return module


def unregistered_holder(owner: nn.Module) -> nn.ModuleDict | None:
    """The adapter holder ``owner`` references without registering it (a tied weight's second
    owner, see :data:`lora_fx.state.ADAPTER_ATTR`), or None."""
    ref = owner.__dict__.get(ADAPTER_ATTR)
    return ref if isinstance(ref, nn.ModuleDict) else None


def set_unregistered_holder_(owner: nn.Module, holder: nn.ModuleDict | None) -> nn.Module:
    """Reference ``holder`` from ``owner`` (and from the region ``owner`` runs, whose passes resolve
    paths through it) without registering it; ``None`` removes the reference.  Returns ``owner``."""
    for target in (owner, region_of(owner)):
        if target is None:
            continue
        if holder is None:
            target.__dict__.pop(ADAPTER_ATTR, None)
        else:
            target.__dict__[ADAPTER_ATTR] = holder
    return owner


def strip_regions_(root: nn.Module) -> nn.Module:
    """Give every module under ``root`` back its class forward: drop regions (and the tensor
    constants torch.fx stored on their modules), instance ``forward`` s (producer tags included), kept-module notes, the
    inference cache, unregistered adapter references and the root's lora_fx
    attributes.  Adapters must have been removed from the records' owners first (their registered
    holders are the records' business).  Returns ``root``."""
    for m in root.modules():
        d = m.__dict__
        gm = d.pop(REGION_ATTR, None)
        for name in list(getattr(gm, "__dict__", ())):  # constants torch.fx set on the module while tracing
            if name.startswith("_tensor_constant") and d.get(name) is gm.__dict__[name]:
                del d[name]
        d.pop(KEPT_ATTR, None)
        d.pop(INFERENCE_ATTR, None)
        d.pop(PARKED_ATTR, None)
        for name in [k for k, v in d.items() if isinstance(v, InstanceForward)]:  # forwards, adapter methods
            del d[name]
        if unregistered_holder(m) is not None:
            del d[ADAPTER_ATTR]
    for attr in (FRONTEND_ATTR, CONFIG_ATTR, OWNS_WEIGHTS_ATTR, POLICY_ATTR, LEFT_OUT_ATTR):
        root.__dict__.pop(attr, None)
    return root
