"""A different adapter per sample, in one batch: :func:`route_adapters`.

Serving and multi-task training batch requests that need different adapters.  Inside
``with lora_fx.route_adapters(model, names):`` sample ``i`` of the batch (dim 0 of the inputs)
sees only adapter ``names[i]`` (or the base model for ``None``), as if that adapter ran alone on
it: outputs *and* gradients, in training and inference, for adapters of different ranks and
alphas.  Each factored site computes all samples at once with gathers and batched matmuls over the
stacked factors (:mod:`lora_fx.ops_route`), never a Python loop over adapters.

The first routing turns each site's chain of adapters into one routed node (:mod:`lora_fx.passes.route`:
a graph edit, so a compiled model compiles once more); after that, a routing is a refill of one
``(b,)`` buffer: another routing of the same batch size reuses the compiled graph, and a new batch
size compiles once (as any new input shape).  Outside the block the model computes what it did
before (the active adapters, their mixing weights).

Semantics (PEFT's ``adapter_names``): inside the block every routed adapter contributes its full
update at ``scaling = alpha / rank``, whatever its mixing weight, active-set membership or on/off
switch; those are restored on exit.  Adapters that no sample uses get exact-zero gradients (not ``None``): an optimizer's weight
decay and momentum still move them, so give it the adapters in use
(:func:`lora_fx.mark_only_lora_as_trainable` after :func:`lora_fx.set_active_adapters`, or
parameter groups).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from lora_fx.passes.route import is_routed, route_, unroute_

from .errors import RoutingError
from .state import ROUTE_ATTR, ROUTE_BUFFER, RouteState, adapter_names, check_adapter_names, iter_adapters, \
    require_adapted

__all__ = ["route_adapters", "enable_routing_", "disable_routing_", "RoutingError"]


def enable_routing_(model: nn.Module) -> nn.Module:
    """Turn ``model``'s factored sites into routed nodes now (what the first :func:`route_adapters`
    does), e.g. before ``torch.compile``; a no-op when they are routed for the current adapters.
    Outputs do not change.  Returns ``model``.

    Raises:
        NotAdaptedError: ``model`` carries no adapters.
    """
    require_adapted(model, "enable_routing_")
    st = getattr(model, ROUTE_ATTR, None)
    if not isinstance(st, RouteState) or st.names != tuple(adapter_names(model)):
        route_(model)
    return model


def disable_routing_(model: nn.Module) -> nn.Module:
    """Restore the per-adapter chains of a routed ``model`` (outputs do not change); returns ``model``."""
    return unroute_(model)


def _ids(names: Sequence[Optional[str]], st: RouteState, device) -> torch.Tensor:
    index = {n: i for i, n in enumerate(st.names)}
    return torch.tensor([-1 if n is None else index[n] for n in names], dtype=torch.long, device=device)


def _fill_(model: nn.Module, st: RouteState, ids: torch.Tensor) -> None:
    holders = [model.get_submodule(p) if p else model for p in st.holders]
    if not holders:
        return
    buf = holders[0]._buffers[ROUTE_BUFFER]
    if buf.shape == ids.shape and buf.device == ids.device:
        with torch.no_grad():
            buf.copy_(ids)  # one tensor shared by every holder: a refill, never a new graph
        return
    for h in holders:
        h._buffers[ROUTE_BUFFER] = ids


def _set_(adapter, active: bool, enabled: bool, mix: float) -> None:
    """Set an adapter's switch state (in the active set, on/off, mixing weight) and refresh its
    scaling, only when something changes (a fill per adapter)."""
    if adapter.active != active or adapter.enabled != enabled or adapter.mix != mix:
        adapter.active, adapter.enabled, adapter.mix = active, enabled, mix
        adapter.refresh_scaling_()


def _state(model: nn.Module, names: list) -> RouteState:
    """The model's current :class:`RouteState` (routing it first if needed), names checked."""
    st = getattr(model, ROUTE_ATTR, None)
    if not isinstance(st, RouteState):  # the first routing (add/delete_adapter unroute: a state is current)
        require_adapted(model, "route_adapters")
        enable_routing_(model)
        st = getattr(model, ROUTE_ATTR)
    known = set(st.names)
    if any(n is not None and n not in known for n in names):
        check_adapter_names(model, [n for n in names if n is not None])  # raises, listing the known names
    return st


@contextlib.contextmanager
def route_adapters(model: nn.Module, names: Sequence[Optional[str]]) -> Iterator[nn.Module]:
    """Context manager: inside, sample ``i`` of every batch (dim 0 of the inputs) sees only adapter
    ``names[i]``, or the base model where ``names[i]`` is None.

    Example::

        with lora_fx.route_adapters(model, ["math", "code", None, "math"]):
            logits = model(input_ids)           # input_ids: (4, seq)
            loss(logits, labels).backward()     # "math" gets gradients from samples 0 and 3 only

    Entering costs a few microseconds per adapter module (a buffer refill), so it can wrap every
    batch of a serving loop.

    Args:
        model: a module from :func:`lora_fx.transform` (its factored sites are routed on first use).
        names: one adapter name (or None) per sample; adapters may differ in rank and alpha.

    Raises:
        UnknownAdapterError: a name the model does not have (the message lists the ones it has).
        RoutingError: ``names`` is not a sequence of names; a routing is already active; an
            adapter named has sites that cannot be routed (DoRA adapters, merge-lowered sites,
            expert stacks: the message lists them and the fix); and, at a forward inside the
            block, a site whose input has another number of samples than ``len(names)`` (the
            message names both numbers and the site).
        NotAdaptedError: ``model`` carries no adapters.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise RoutingError(f"route_adapters() needs one adapter name (or None) per sample, as a list; got {names!r}")
    names = list(names)
    if not names or not all(n is None or isinstance(n, str) for n in names):
        raise RoutingError(f"route_adapters() needs a non-empty list of adapter names or None, got {names!r}")
    st = _state(model, names)
    if st.active:
        raise RoutingError("route_adapters() is already active on this model; leave the outer block first")
    refused = {n: st.unroutable[n] for n in dict.fromkeys(names) if n in st.unroutable}
    if refused:
        lines = [f"  - {n!r}: " + "; ".join(why[:6]) + (f"; ... ({len(why)} in all)" if len(why) > 6 else "")
                 for n, why in refused.items()]
        raise RoutingError("route_adapters() computes each sample's adapter factored at every site, but these "
                           "adapters have sites it cannot route:\n" + "\n".join(lines) + "\nHow to fix: transform "
                           "those adapters with lowering='factored' (exact for linear, embedding and ungrouped conv "
                           "sites), exclude the other sites from them, or run them alone with "
                           "lora_fx.set_active_adapters(model, name).")
    saved = [(a, a.active, a.enabled, a.mix) for _, a in st.adapters]
    for name, a in st.adapters:
        # routed adapters at their base scaling; unroutable ones (not named) add nothing at their
        # merged sites, so every sample sees only its own adapter
        routed = name not in st.unroutable
        _set_(a, routed, routed, 1.0)
    device = st.adapters[0][1].lora_A.device if st.adapters else torch.device("cpu")
    _fill_(model, st, _ids(names, st, device))
    st.active = True
    try:
        yield model
    finally:
        st.active = False
        _fill_(model, st, _ids([], st, device))
        for a, active, enabled, mix in saved:
            _set_(a, active, enabled, mix)
