"""The transformers adapter methods lora_fx sets on the models it adapts (the registry and the
installer; the methods themselves are :mod:`lora_fx.hf_adapter_api`, which fills :data:`METHODS`
when ``lora_fx`` is imported)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from .instance_forward import InstanceForward

__all__ = ["AdapterMethod", "METHODS", "install_adapter_api_"]

#: method name → ``fn(model, *args, **kwargs)`` (filled by :mod:`lora_fx.hf_adapter_api`)
METHODS: dict[str, Callable[..., Any]] = {}


class AdapterMethod(InstanceForward):
    """``model.<name>`` of an adapted transformers model: calls lora_fx's counterpart with ``model``.
    Pickles and deep-copies by reference to its model (a copy's method acts on the copy); an
    :class:`~lora_fx.instance_forward.InstanceForward`, so ``strip_regions_`` (fold) removes it."""

    def __init__(self, module: nn.Module, name: str):
        super().__init__(module)
        self.name = name

    @property
    def __signature__(self) -> inspect.Signature:
        params = list(inspect.signature(METHODS[self.name]).parameters.values())[1:]
        return inspect.Signature(params)

    def __call__(self, *args, **kwargs):
        return METHODS[self.name](self.__self__, *args, **kwargs)

    @property
    def __doc__(self):  # noqa: D401 (shown by help(model.set_adapter))
        return METHODS[self.name].__doc__

    def __reduce__(self):
        return (type(self), (self.__self__, self.name))

    def __repr__(self) -> str:
        return f"<lora_fx adapter method {self.name} of {type(self.__self__).__name__}>"


def install_adapter_api_(root: nn.Module) -> nn.Module:
    """Set :data:`METHODS` on ``root`` (a transformers model lora_fx adapted, kept class) as instance
    attributes; a model without transformers' adapter API is left as it is.  Returns ``root``."""
    if not callable(getattr(type(root), "disable_adapters", None)):
        return root
    for name in METHODS:
        if callable(getattr(type(root), name, None)):
            root.__dict__[name] = AdapterMethod(root, name)
    return root
