"""Producer tags: adapter-input recomputation across the model's own Python.

On a model that kept its class, a projection's input often comes from a norm module called by the
model's own code (a Hugging Face decoder layer calls ``input_layernorm`` and hands its output to
``q_proj``, ``k_proj`` and ``v_proj``; ``post_attention_layernorm`` feeds the MLP region).  No graph
holds both, so the static match of :mod:`lora_fx.passes.match_recompute` cannot see it.  The norm's
instance ``forward`` (:class:`ProducerForward`, set on the adapted copy's norms) carries the producer
across instead.

* **Eager training**: the forward tags its output ``x`` with ``(u, module, versions of x and u, the
  parameters it read, autocast state)`` (``u`` its input).  A factored linear site whose input has
  no static spec looks the tag up (:func:`tag_spec`) and, when it is valid, keeps ``u`` instead of
  ``x`` (the same size; the norm's own backward keeps ``u`` or its fp32 copy anyway), recomputing
  ``x = type(module).forward(module, u)`` in backward under the recorded autocast state and with the
  recorded parameters (those a ``torch.func.functional_call`` swapped in, say).  The sites reading
  one output share one recomputation (a cell in the tag: computed by the first backward that needs
  it, dropped by the last).
* **Under torch.compile** (grad enabled, not exporting): the forward runs under
  ``torch.utils.checkpoint``, so AOTAutograd's partitioner recomputes ``x`` in backward from ``u``
  instead of saving it for the adapters (as :func:`lora_fx.recompute.recompute_point` does for a
  producer inside a graph).
* **No grad** (inference, ``generate``): the class forward, nothing else — no hook, so the module
  keeps ``nn.Module.__call__``'s fast path.

A tag is used only when it cannot change a gradient: grad mode on, not compiling, no functorch
transform or forward-mode AD active (the checks of :func:`lora_fx.recompute.down`), ``x`` and ``u``
unchanged in place since the norm ran (version counters; a forward hook that returns another tensor
hands on an untagged one), and the module's parameters unchanged in place by backward time (checked; an
error like autograd's otherwise).  The producers are norm modules whose class forward is a pure
function of one tensor and their 1-D parameters (checked once per class by tracing it with torch.fx:
no random, in-place or module-calling op, no ``training`` read) and that have no instance
``forward`` of their own.  ``fold`` removes the forwards.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.utils.checkpoint as _checkpoint
from torch import fx, nn
from torch.nn.utils.stateless import _reparametrize_module

from .instance_forward import InstanceForward

__all__ = ["TAG", "PARKED_ATTR", "ProducerForward", "is_producer", "install_producer_tags_", "remove_producer_tags_",
           "unpark_producer_tags_", "tag_spec",
           "recompute_tagged"]

#: Attribute set on a producer's output tensor.
TAG = "_lora_fx_producer"
#: Attribute marking a norm whose :class:`ProducerForward` the inference cache took off (restored
#: when it goes off).
PARKED_ATTR = "_lora_fx_producer_parked"
_PURE: dict[tuple, bool] = {}
_IMPURE_NAMES = ("dropout", "rand", "bernoulli", "normal", "uniform", "training")


class _ParamsAsValues(fx.Tracer):
    """A tracer that hands the module's parameters to its forward as they are (not as proxies), so
    a branch on a parameter's dtype (T5's ``T5LayerNorm``) resolves as it will when the forward runs."""

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val


def _pure_class(cls: type, m: nn.Module) -> bool:
    """Whether ``cls.forward`` traces (torch.fx, with a copy of ``m``'s parameters as values) to a
    function of one tensor: no module call, no in-place method or write to a parameter, no random op,
    no ``training`` read.  Cached per class and parameter dtypes (a forward may branch on them)."""
    key = (cls, tuple(p.dtype for p in m.parameters()))
    if key in _PURE:
        return _PURE[key]
    ok = False
    try:
        # traced on a copy: it takes the tensor constants torch.fx stores on the root, and an
        # in-place write to a parameter (no graph node when parameters are values) shows in its
        # version counter; no_grad: the values computed from parameters record nothing
        probe = copy.deepcopy(m)
        versions = [p._version for p in probe.parameters()]
        with torch.no_grad():
            g = _ParamsAsValues().trace(probe)
        phs = [n for n in g.nodes if n.op == "placeholder"]
        ok = (len(phs) == 1 and not phs[0].args
              and versions == [p._version for p in probe.parameters()])
        for n in g.nodes:
            name = str(getattr(n.target, "__name__", n.target)).lower()
            if n.op == "call_module" or any(w in name for w in _IMPURE_NAMES):
                ok = False
            if n.op == "call_method" and name.endswith("_") and not name.endswith("__"):
                ok = False
            if n.op == "call_function" and name.endswith("_") and not name.endswith("__"):
                ok = False
    except Exception:  # not traceable: not a producer
        ok = False
    _PURE[key] = ok
    return ok


def is_producer(m: nn.Module) -> bool:
    """A norm module (``nn.LayerNorm``, ``nn.RMSNorm``, or a class named ``*RMSNorm`` / ``*LayerNorm``)
    without children, with only 1-D parameters and no instance ``forward``, whose class forward is
    pure (see :func:`_pure_class`)."""
    if (list(m.children()) or any(p.ndim != 1 for p in m.parameters()) or list(m.buffers())
            or "forward" in m.__dict__):
        return False
    name = type(m).__name__
    if not (isinstance(m, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or name.endswith(("RMSNorm", "LayerNorm"))):
        return False
    return _pure_class(type(m), m)


class ProducerForward(InstanceForward):
    """``module.forward`` of a producer norm: the class forward; in eager training its output is
    tagged, under ``torch.compile`` with grad it runs as a checkpoint region (see the module docstring).

    Called as the class forward is: ``u (..., d)`` → the norm's output, same shape and dtype as the
    class forward gives; calls with more than one argument or with keywords are the plain class call.
    Raises what the class forward raises.
    """

    def __call__(self, *args, **kwargs):
        module = self.__self__
        forward = type(module).forward
        if kwargs or len(args) != 1 or not torch.is_grad_enabled():
            return forward(module, *args, **kwargs)
        u = args[0]
        if torch.compiler.is_compiling():
            # torch.export keeps the plain call (an exported program holds no checkpoint regions)
            if torch.compiler.is_exporting() or not isinstance(u, torch.Tensor) or not u.requires_grad:
                return forward(module, u)
            return _checkpoint.checkpoint(lambda t: forward(module, t), u, use_reentrant=False,
                                          preserve_rng_state=False)
        out = forward(module, u)
        if type(out) is torch.Tensor and type(u) is torch.Tensor and out is not u and out.requires_grad:
            dev = out.device.type
            # the parameters as this call read them (torch.func.functional_call may have swapped some
            # in); a producer has no children, so its own table is all of them
            params = {k: p for k, p in module._parameters.items() if p is not None}
            out.__dict__[TAG] = (u, module, (out._version, u._version), params,
                                 tuple(p._version for p in params.values()),
                                 (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)), {"n": 0})
        return out


def install_producer_tags_(root: nn.Module) -> nn.Module:
    """Set a :class:`ProducerForward` on every producer module under ``root`` (once); returns ``root``."""
    for m in root.modules():
        if is_producer(m):
            m.__dict__["forward"] = ProducerForward(m)
    return root


def remove_producer_tags_(root: nn.Module, *, park: bool = False) -> nn.Module:
    """Give every module under ``root`` with a :class:`ProducerForward` its class forward back;
    with ``park``, mark each (:data:`PARKED_ATTR`, kept by copies and pickles) for
    :func:`unpark_producer_tags_`.  Returns ``root``."""
    for m in root.modules():
        if isinstance(m.__dict__.get("forward"), ProducerForward):
            del m.__dict__["forward"]
            if park:
                m.__dict__[PARKED_ATTR] = True
    return root


def unpark_producer_tags_(root: nn.Module) -> nn.Module:
    """Set a :class:`ProducerForward` again on exactly the modules :func:`remove_producer_tags_`
    parked (those still producers); returns ``root``."""
    for m in root.modules():
        if m.__dict__.pop(PARKED_ATTR, False) and is_producer(m):
            m.__dict__["forward"] = ProducerForward(m)
    return root


def _tag_of(x: torch.Tensor) -> tuple[Optional[tuple], Optional[tuple]]:
    """``(tag, view shape)``: the tag on ``x`` itself (shape None), or on ``x``'s base when ``x`` is a
    contiguous view of the whole contiguous tagged output (``base.view(x.shape)`` is ``x``, value
    for value: GPT-2's ``Conv1D`` reads ``ln(u).view(-1, d)``); ``(None, None)`` otherwise."""
    tag = x.__dict__.get(TAG)
    if tag is not None:
        return tag, None
    base = x._base
    if (base is None or TAG not in base.__dict__ or x.numel() != base.numel() or not x.is_contiguous()
            or not base.is_contiguous() or x.storage_offset() != base.storage_offset()):
        return None, None
    return base.__dict__[TAG], tuple(x.shape)


def tag_spec(x: torch.Tensor) -> Optional[tuple]:
    """``("tagged", (u,), {"tag": tag[, "shape": x.shape]})`` when ``x`` is a producer's output, or a
    view of the whole of it (``shape``), unchanged since, and both it and the producer's input need
    a gradient; else None.  Counts one more consumer."""
    tag, shape = _tag_of(x)
    if tag is None:
        return None
    u, (version, u_version) = tag[0], tag[2]
    # x (a view shares its base's counter) or u changed in place since the norm ran: x is no longer norm(u)
    if x._version != version or u._version != u_version or not x.requires_grad or not u.requires_grad:
        return None
    tag[6]["n"] += 1
    return "tagged", (u,), ({"tag": tag} if shape is None else {"tag": tag, "shape": shape})


def recompute_tagged(u: torch.Tensor, tag: tuple, shape: Optional[tuple] = None) -> torch.Tensor:
    """The producer's output again, from its input ``u`` (shared by the sites that read it when
    recomputed without grad; the last consumer drops it), viewed as ``shape`` when given.

    Raises:
        RuntimeError: a parameter the producer read was modified in place since the forward pass.
    """
    _, module, _, params, versions, (dev, enabled, dtype), cell = tag
    if any(p._version != v for p, v in zip(params.values(), versions)):
        raise RuntimeError(f"a parameter of {type(module).__name__} was modified in place after the forward "
                           "pass; its output cannot be recomputed for the LoRA gradient (as autograd would "
                           "refuse a modified saved tensor)")
    shared = not torch.is_grad_enabled()  # create_graph=True recomputes differentiably, per site
    x = cell.get("x") if shared else None
    if x is None:
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            if all(module._parameters.get(k) is v for k, v in params.items()):
                x = type(module).forward(module, u)
            else:  # the forward read other tensors than the module holds now (functional_call): those
                with _reparametrize_module(module, params, tie_weights=False, strict=False):
                    x = type(module).forward(module, u)
        if shared:
            cell["x"] = x
    cell["n"] -= 1
    if cell["n"] <= 0:
        cell.pop("x", None)
    return x if shape is None else x.view(shape)
