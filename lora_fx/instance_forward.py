"""The base of every ``forward`` (and other method) lora_fx sets on a module instance.

A module that keeps its class but runs other code (a region's rewritten graph, a class forward with
adapted expert stacks, a norm whose output carries a producer tag) gets an instance attribute
``forward``: ``nn.Module.__call__`` (hooks, FSDP2, checkpointing) calls it as it would the class
forward.  :class:`InstanceForward` makes such a callable behave like the bound method it replaces.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable

from torch import nn

__all__ = ["InstanceForward"]

#: class forward → its signature without ``self`` (signatures are immutable)
_SIGNATURES: "weakref.WeakKeyDictionary[Callable[..., Any], inspect.Signature]" = weakref.WeakKeyDictionary()


class InstanceForward:
    """A callable set as ``module.forward`` (an instance attribute) by lora_fx.

    It holds its module (``__self__``, as a bound method would), pickles and deep-copies by
    reference to it (``__reduce__``: a copy of the model gets a forward bound to the copied
    module), and its ``__signature__`` is the class forward's without ``self`` (so
    ``inspect.signature(module.forward)`` reads as before).  Subclasses define ``__call__``.
    """

    def __init__(self, module: nn.Module):
        self.__self__ = module

    @property
    def module(self) -> nn.Module:
        return self.__self__

    @property
    def __signature__(self) -> inspect.Signature:
        fn = type(self.__self__).forward
        sig = _SIGNATURES.get(fn)
        if sig is None:  # HF's generate reads it on every call: computed once per class forward
            sig = inspect.signature(fn)
            sig = _SIGNATURES[fn] = sig.replace(parameters=list(sig.parameters.values())[1:])
        return sig

    def __reduce__(self):
        return (type(self), (self.__self__,))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} of {type(self.__self__).__name__}>"
