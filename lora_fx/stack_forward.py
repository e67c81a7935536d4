"""The instance ``forward`` of a kept module whose own code reads stacks of expert weights.

A module the regions front-end keeps as its own Python (transformers' ``*Experts``: a decorated
forward with a data-dependent expert loop, or grouped GEMMs) but whose own parameters are stacks of
expert matrices gets a *weights region* (:mod:`lora_fx.passes.capture_stacks`): a graph with no
inputs that returns ``{parameter name: weight}``, where the adapter pass puts each adapter's lazy
``W + ΔW`` (:func:`lora_fx.ops_experts.lora_weight`).  :class:`StackForward`, set as the module's
``forward``, evaluates that graph and runs the module's **class** forward with those values in
place of its parameters (``torch.func.functional_call``'s mechanism): ``type(module)`` is
unchanged, the state dict and ``named_parameters`` are the module's own, and the experts' code
sees ``W[e] + ΔW[e]`` computed factored.  Fold removes the region and the forward with every other
region (:func:`lora_fx.regions.strip_regions_`).
"""

from __future__ import annotations

import torch
from torch.nn.utils.stateless import _reparametrize_module

from .regions import RegionForward
from .state import REGION_ATTR

__all__ = ["StackForward"]


class StackForward(RegionForward):
    """``module.forward`` of a kept module with adapted stacks: ``type(module).forward(module, ...)``
    with the parameters its weights region returns."""

    def __call__(self, *args, **kwargs):
        module = self.__self__
        gm = module.__dict__[REGION_ATTR]
        if torch.compiler.is_compiling():
            overrides = self.select(gm)(module)
        else:
            if gm is not self._gm or gm.code_version != self._version:
                self._refresh(gm)
            overrides = self._code(module)
            params = module._parameters
            if all(v is params.get(k) for k, v in overrides.items()):  # no stack adapted (or all deleted)
                return type(module).forward(module, *args, **kwargs)
        # torch.func.functional_call's swap, without calling the module again (which would re-enter here)
        with _reparametrize_module(module, overrides, tie_weights=False, strict=False):
            return type(module).forward(module, *args, **kwargs)
