"""Inference at the folded model's speed without folding: an opt-in cache of merged weights.

``lora_fx.inference_cache_(model)`` (or ``with lora_fx.inference_cache(model): ...``) makes every
region of a model that kept its class run, under ``torch.no_grad()`` / ``torch.inference_mode()``,
an *inference variant* of its graph (:mod:`lora_fx.passes.inference_variant`): each factored site
``op(x, W) + s·op_B(op_A(x))`` becomes ``op(x, W')`` with ``W' = W + Σ ΔW`` computed as
:func:`lora_fx.fold` computes it (float32 or wider, one rounding to ``W``'s dtype), so outputs are
bit for bit the folded model's.  ``W'`` is kept until anything it was computed from changes: the
cache key holds the identity, storage pointer and version counter of ``W`` and of every adapter's
``lora_A``, ``lora_B`` and ``scaling``.  In-place edits (optimizer steps, ``load_adapter_values_``,
``set_scale_``, enabling or disabling, mixing weights, ``load_state_dict``) bump a version counter,
``.data`` swaps and re-assigned tensors change the pointer or identity, and graph rewrites
(``add_adapter``, ``delete_adapter``, ``set_active_adapters``) rebuild the variant; each costs one
re-merge on the next call.  An in-place write through ``.data`` (``p.data.mul_(2)``) is the one
change no key can see: PyTorch gives ``p.data`` its own version counter.  Calling
:func:`inference_cache_` again (or entering :func:`inference_cache`) drops the merged weights.

Grad-enabled calls, ``torch.compile`` (compiled graphs keep the factored form) and adapters whose
dropout is in training mode run the region's own factored code.  While the cache is on, the norm
modules run their plain class forward (no producer tags, :mod:`lora_fx.producers`): training with
the cache on keeps the norm outputs that feed adapters instead of recomputing them; turning the
cache off restores the tags.  Memory: one merged copy of every
adapted weight while the cache is on (:func:`inference_cache_bytes`, shown by ``summary()``), which
is why it is off until asked for; ``inference_cache_(model, enabled=False)`` frees it.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
from torch import fx, nn
from torch.fx.graph_module import _forward_from_src

from .errors import ConfigError
from lora_fx.passes.fold import fold_update
from lora_fx.passes.inference_variant import inference_graph
from .producers import remove_producer_tags_, unpark_producer_tags_
from .state import INFERENCE_ATTR, REGION_ATTR, require_adapted, unwrap
from . import weights

__all__ = ["InferenceCache", "inference_cache_", "inference_cache", "inference_cache_bytes"]


def _global_hooks() -> bool:
    mm = torch.nn.modules.module
    return bool(mm._global_forward_hooks or mm._global_forward_pre_hooks)


class _Slot:
    """One site of a variant: bound to the dicts holding its base weight and its adapters' tensors
    (so a re-assigned parameter is seen), it returns the merged weight, re-merging when its key moved.

    The key is the identity, ``data_ptr`` and ``_version`` of ``W`` and of each adapter's ``lora_A``,
    ``lora_B`` and ``scaling``; ``refs`` holds those tensors (identities are checked against it), so
    none of them can be freed and its identity reused while the key is kept."""

    __slots__ = ("cache", "table", "name", "tables", "adapters", "key", "refs", "merged", "__weakref__")

    def __init__(self, cache: "InferenceCache", table: dict, name: str, adapters: list[nn.Module]):
        self.cache, self.table, self.name, self.adapters = cache, table, name, adapters
        self.tables = tuple((a._parameters, a._buffers) for a in adapters)
        self.key: Optional[tuple] = None
        self.refs: tuple = ()
        self.merged: Optional[torch.Tensor] = None
        cache._slots.add(self)

    def reset(self) -> None:
        """Forget the merged weight (merged again on the next call)."""
        self.key, self.refs, self.merged = None, (), None

    def weight(self) -> torch.Tensor:
        w = self.table[self.name]
        refs = self.refs
        if len(self.tables) == 1:  # one adapter (the usual case): identities checked against refs, no id() calls
            p, b = self.tables[0]
            A, B, s = p["lora_A"], p["lora_B"], b["scaling"]
            key = (w.data_ptr(), w._version, A.data_ptr(), A._version, B.data_ptr(), B._version, s.data_ptr(),
                   s._version)
            if key == self.key and w is refs[0] and A is refs[1] and B is refs[2] and s is refs[3]:
                return self.merged
            return self._miss(w, key)
        key = (id(w), w.data_ptr(), w._version)
        for p, b in self.tables:
            A, B, s = p["lora_A"], p["lora_B"], b["scaling"]
            key += (id(A), A.data_ptr(), A._version, id(B), B.data_ptr(), B._version, id(s), s.data_ptr(), s._version)
        if key == self.key and w is refs[0]:
            return self.merged
        return self._miss(w, key)

    def _miss(self, w: torch.Tensor, key: tuple) -> torch.Tensor:
        refs = (w,) + tuple(t for p, b in self.tables for t in (p["lora_A"], p["lora_B"], b["scaling"]))
        self.merged = self.cache.merged(w, self.adapters, key, refs)
        self.key, self.refs = key, refs
        return self.merged


class _Variant:
    """A region's inference code and its slots; ``check`` (None when nothing can differ) tells
    whether the code equals the region's own code now."""

    __slots__ = ("code", "slots", "dropouts", "modules", "check")

    def __init__(self, code: Callable[..., Any], slots: tuple, dropouts: list, modules: list):
        self.code, self.slots, self.dropouts, self.modules = code, slots, dropouts, modules
        self.check = self.usable if (dropouts or modules) else None

    def release(self) -> None:
        """Drop the merged weights of its slots (the variant is being replaced)."""
        for s in self.slots:
            s.reset()

    def usable(self) -> bool:
        """False while an adapter dropout it skips is training, or a module call it replaced by the
        functional op has hooks (then the region's own code runs)."""
        for d in self.dropouts:
            if d.training:
                return False
        if self.modules:
            for m in self.modules:
                if m._forward_hooks or m._forward_pre_hooks:
                    return False
            if _global_hooks():
                return False
        return True


class InferenceCache:
    """The merged weights of one model (shared by its root and all its regions).

    Merged weights are shared by the sites of one base weight with the same adapters (a tied
    embedding and output head: one copy), and hold strong references to the tensors of their key, so
    no identity in a live key can be reused.  Copies and pickles of a model get an empty cache (the
    cache is on in the copy; its weights are merged again on first use).

    Attributes:
        misses: merges computed so far (each first call, and each call after an invalidation).
    """

    def __init__(self) -> None:
        # id(W) -> (key, weak refs to the key's tensors, weak ref to the merged weight): lets the sites
        # of one weight share a merged copy; the slots hold the merged weights (and their keys' tensors)
        self._entries: dict[int, tuple[tuple, tuple, weakref.ref]] = {}
        self._slots: "weakref.WeakSet[_Slot]" = weakref.WeakSet()
        self._codes: dict[tuple, Callable[..., Any]] = {}
        self.misses = 0

    # -- graph side --------------------------------------------------------------------------
    def merged(self, w: torch.Tensor, adapters: list[nn.Module], key: tuple, refs: tuple) -> torch.Tensor:
        """``W + Σ ΔW`` of ``adapters`` (in fold's order) for the slot key ``key`` (``refs``: the
        tensors it was read from): the merged weight of another site with an equal key and the same
        tensors (a tied weight), else merged now as fold merges."""
        e = self._entries.get(id(w))
        if e is not None and e[0] == key and len(e[1]) == len(refs) and all(r() is x for r, x in zip(e[1], refs)):
            hit = e[2]()
            if hit is not None:
                return hit
        self.misses += 1
        merged = weights.fold_into(w, lambda out: fold_update(out, list(adapters)))
        self._entries[id(w)] = (key, tuple(weakref.ref(t) for t in refs), weakref.ref(merged))
        return merged

    def variant(self, module: nn.Module, gm: fx.GraphModule) -> Optional[_Variant]:
        """The inference variant of region ``gm`` (run as ``module``), or None when none of its
        sites can use a merged weight."""
        plan = inference_graph(gm)
        if plan is None:
            return None
        pc = plan.graph.python_code(root_module="self")
        ckey = (pc.src, tuple(sorted((k, id(v)) for k, v in pc.globals.items())))
        code = self._codes.get(ckey)
        if code is None:
            code = self._codes[ckey] = _forward_from_src(pc.src, pc.globals)
        slots = []
        for wpath, apaths in plan.sites:
            owner_path, _, name = wpath.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            table = owner._parameters if name in owner._parameters else owner._buffers
            slots.append(_Slot(self, table, name, [gm.get_submodule(p) for p in apaths]))
        return _Variant(code, tuple(slots), [gm.get_submodule(p) for p in plan.dropouts],
                        [gm.get_submodule(p) for p in plan.modules])

    # -- user side ---------------------------------------------------------------------------
    def _held(self) -> dict[int, torch.Tensor]:
        return {id(s.merged): s.merged for s in list(self._slots) if s.merged is not None}

    @property
    def nbytes(self) -> int:
        """Bytes of the merged weights held now (a weight shared by several sites counts once)."""
        return sum(t.numel() * t.element_size() for t in self._held().values())

    def __len__(self) -> int:
        return len(self._held())

    def clear(self) -> None:
        """Drop every merged weight (they are merged again on the next call)."""
        for s in list(self._slots):
            s.reset()
        self._entries.clear()

    def __deepcopy__(self, memo) -> "InferenceCache":
        return InferenceCache()

    def __reduce__(self):
        return (InferenceCache, ())


def _root(model: nn.Module, what: str) -> nn.Module:
    root = unwrap(model)
    require_adapted(root, what)
    if isinstance(root, fx.GraphModule):
        raise ConfigError(
            f"{what}() works on models that kept their class (Hugging Face models, and any model torch.fx "
            f"cannot capture whole); this model was captured whole as a {type(root).__name__}. For inference at "
            "the base model's speed use lora_fx.fold(model).")
    return root


def _region_modules(root: nn.Module) -> Iterator[nn.Module]:
    for _, m in root.named_modules():
        if REGION_ATTR in m.__dict__:
            yield m


def _set(root: nn.Module, cache: Optional[InferenceCache]) -> None:
    for m in [root, *_region_modules(root)]:
        if cache is None:
            m.__dict__.pop(INFERENCE_ATTR, None)
        else:
            m.__dict__[INFERENCE_ATTR] = cache
        fwd = m.__dict__.get("forward")
        if hasattr(fwd, "invalidate"):
            fwd.invalidate()


def inference_cache_(model: nn.Module, *, enabled: bool = True) -> nn.Module:
    """Turn the inference cache of an adapted model on (``enabled=True``) or off and free it.

    While on, calls under ``torch.no_grad()`` / ``torch.inference_mode()`` compute each factored
    site (``F.linear``, ``addmm`` as in GPT-2's ``Conv1D``, ``F.embedding``, convolutions, and
    ``nn.Linear`` / ``nn.Embedding`` calls inside a region) on a cached merged weight
    ``W + Σ ΔW``: outputs equal ``lora_fx.fold(model)``'s bit for bit, at its speed.  See
    :mod:`lora_fx.inference` for what invalidates an entry.

    Args:
        model: a model from :func:`lora_fx.transform` that kept its class (possibly inside
            ``torch.compile`` / DDP wrappers).
        enabled: ``True`` to turn on; when it is on already, the merged weights are dropped and
            merged again on the next call (the way to pick up an in-place write through ``.data``,
            which no version counter records).  ``False`` to turn off and drop the merged weights.
            While it is on, the norm modules run their plain class forward (their outputs are
            kept, not recomputed, if the model trains meanwhile); turning it off restores that.

    Returns:
        ``model``.

    Raises:
        NotAdaptedError: ``model`` carries no adapters.
        ConfigError: ``model`` was captured whole as a ``GraphModule`` (fold it instead).
    """
    root = _root(model, "inference_cache_")
    current = root.__dict__.get(INFERENCE_ATTR)
    if enabled and current is None:
        _set(root, InferenceCache())
        remove_producer_tags_(root, park=True)  # the norms run their class forward: no lora_fx frame per call
    elif enabled:
        current.clear()
    elif not enabled and current is not None:
        current.clear()
        _set(root, None)
        unpark_producer_tags_(root)
    return model


@contextlib.contextmanager
def inference_cache(model: nn.Module) -> Iterator[nn.Module]:
    """``with lora_fx.inference_cache(model): model.generate(...)``: the cache of
    :func:`inference_cache_` on inside the block (merged afresh on entry); on exit it is freed
    (unless it was on before).  Yields ``model``."""
    root = _root(model, "inference_cache")
    was_on = INFERENCE_ATTR in root.__dict__
    inference_cache_(model, enabled=True)
    try:
        yield model
    finally:
        if not was_on:
            inference_cache_(model, enabled=False)


def inference_cache_bytes(model: nn.Module) -> Optional[int]:
    """Bytes of merged weights the inference cache of ``model`` holds now, or None when it is off."""
    cache = unwrap(model).__dict__.get(INFERENCE_ATTR)
    return None if cache is None else cache.nbytes

