"""Hot-swap controls: rescale, enable/disable and reload adapters *in place*, so a
``torch.compile`` d model keeps its compiled graph and sees the new values.

Every adapted graph reads an adapter through ``get_attr`` nodes of ``lora_A``, ``lora_B`` and the
0-dim ``scaling`` buffer (``alpha / rank · mix · [active and enabled]``).  Dynamo treats parameters and
buffers as graph inputs guarded on shape, dtype, device and ``requires_grad`` only, never on
their values, so changing values in place (``copy_``, ``fill_``) reuses the compiled code; what
recompiles is a change of shape (another rank), dtype or device, or replacing a ``Parameter``
object (mirrors ``torch.compile``'s guard model; see ``torch._dynamo`` "recompilation" docs).

Rank changes under compile: :func:`reserve_rank_` zero-pads every adapter to a maximum rank once,
before compiling; afterwards :func:`load_adapter_values_` loads any rank up to it without
recompiling (padding rows of ``A`` / columns of ``B`` are zero, so ``B @ A`` is unchanged, and the
logical rank used by ``scaling = alpha / rank`` is updated in place).  Without it, loading another
rank needs new ``Parameter`` s of another shape, which recompiles (and is refused here).

All functions take the adapter name (``adapter="default"`` as in ``transform(adapter_name=...)``);
``adapter=None`` means every adapter where documented.  Mutating functions end in ``_`` and return
their argument.  Switching between several named adapters (activate, combine) is
``lora_fx.set_active_adapters`` / ``set_adapter_weights``; these helpers act on values of the
adapters that exist.
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..io._files import ADAPTER_STATE, Entry, Rollback, entry_problems, mismatch_error, plain_keys
from ..state import (ADAPTER_ATTR, adapter_modules, check_adapter_names, iter_adapters, plain_name, require_adapted,
                     trainable_params, unwrap)
from .module import LoraAdapter

__all__ = [
    "select_adapters",
    "set_scale_",
    "enable_adapters_",
    "disable_adapters",
    "load_adapter_values_",
    "reserve_rank_",
]

AdapterSel = Union[None, str, Sequence[str]]


def select_adapters(gm: nn.Module, adapter: AdapterSel = None, *, what: str = "select_adapters"
                    ) -> list[tuple[str, LoraAdapter]]:
    """``(module path, LoraAdapter)`` of every adapter of ``gm`` named ``adapter`` (a name, a list
    of names, or ``None`` for all), each once (shared adapters of tied weights included once).

    Raises:
        NotAdaptedError: ``gm`` carries no lora_fx adapters (``what`` names the caller).
        UnknownAdapterError: no adapter named ``adapter`` (the message lists the names present).
    """
    require_adapted(gm, what)
    names = None if adapter is None else ([adapter] if isinstance(adapter, str) else list(adapter))
    if names is not None:
        check_adapter_names(gm, names or [adapter])
    return [(path, a) for _, path, a in iter_adapters(gm, names)]


def set_scale_(gm: nn.Module, scale: float, *, adapter: AdapterSel = "default") -> nn.Module:
    """Set the mixing weight (``mix``) of adapter(s) in place: ``scaling = alpha / rank · scale``
    (PEFT's ``set_scale`` / diffusers' ``lora_scale``) while the adapter is active and switched
    on.  Only the mixing weight changes (the active set and the on/off switch are independent), so
    ``set_scale_`` back to the old value restores the old output; ``scale = 0`` silences the
    adapter without switching it off.  Compiled graphs see the new value without recompiling.

    Args:
        gm: a module from :func:`lora_fx.transform`.
        scale: a finite float (1.0 is the trained scaling).
        adapter: adapter name, list of names, or ``None`` for all.

    Returns:
        ``gm``.

    Raises:
        ConfigError: ``scale`` is not a finite real number.
        UnknownAdapterError: no such adapter (also a NotAdaptedError).
    """
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(f"scale must be a real number, got {scale!r}") from None
    if not torch.isfinite(torch.tensor(value)):
        raise ConfigError(f"scale must be finite, got {scale!r}")
    for _, a in select_adapters(gm, adapter, what="set_scale_"):
        a.mix = value
        a.refresh_scaling_()
    return gm


def enable_adapters_(gm: nn.Module, enabled: bool = True, *, adapter: AdapterSel = None) -> nn.Module:
    """Switch adapter(s) on (or off, ``enabled=False``) in place (PEFT's
    ``enable_adapter_layers`` / ``disable_adapter_layers``).

    The switch is independent of the active set and of the mixing weights: a switched-off adapter
    multiplies its delta by 0, and switching it on again gives back exactly the contribution it had
    (an adapter outside the active set, e.g. one added with ``add_adapter(..., activate=False)``,
    stays out).  Its branch still runs, so compiled graphs stay valid and do not recompile;
    :func:`lora_fx.adapter_parameters` leaves switched-off adapters out.

    Args:
        gm: a module from :func:`lora_fx.transform`.
        enabled: new state of the switch.
        adapter: adapter name, list of names, or ``None`` (default) for all.

    Returns:
        ``gm``.

    Raises:
        UnknownAdapterError: no such adapter (also a NotAdaptedError).
    """
    for _, a in select_adapters(gm, adapter, what="enable_adapters_"):
        a.enabled = bool(enabled)
        a.refresh_scaling_()
    return gm


@contextlib.contextmanager
def disable_adapters(gm: nn.Module, *, adapter: AdapterSel = None) -> Iterator[nn.Module]:
    """Context manager: inside, adapter(s) (all by default) are switched off, so ``gm`` computes
    the base model; on exit each adapter's switch (``enabled``) is put back to what it was (also on
    error).  Only the switch is saved and restored: the active set and the mixing weights are not
    touched, and changes made to them inside the block stay.  Mirrors HF PEFT's
    ``with model.disable_adapter():``.  No re-tracing, no recompilation under ``torch.compile``
    (only the ``scaling`` buffers change).

    Example::

        with lora_fx.disable_adapters(gm):
            base_out = gm(x)

    Raises:
        NotAdaptedError: ``gm`` carries no adapters, or none named ``adapter``.
    """
    saved = [(a, a.enabled) for _, a in select_adapters(gm, adapter, what="disable_adapters")]
    for a, _ in saved:
        a.enabled = False
        a.refresh_scaling_()
    try:
        yield gm
    finally:
        for a, enabled in saved:
            a.enabled = enabled
            a.refresh_scaling_()


def _adapter_name_of(key: str) -> Optional[str]:
    """The adapter-name segment of an adapter state key (``"fc.lora.<name>.weight.lora_A"``), or None."""
    parts = key.split(".")
    return parts[-3] if len(parts) >= 4 and parts[-4] == ADAPTER_ATTR else None


def _renamed(key: str, adapter: str) -> str:
    parts = key.split(".")
    parts[-3] = adapter
    return ".".join(parts)


def load_adapter_values_(
    gm: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    adapter: str = "default",
    alpha: Union[None, float, Mapping[str, float]] = None,
) -> nn.Module:
    """Copy adapter factors into adapter ``adapter`` of ``gm`` in place (``Tensor.copy_`` under
    ``no_grad``; ``Parameter`` objects, shapes and devices stay), so compiled graphs see the new
    values without recompiling.

    ``state`` holds ``{key: tensor}`` as :func:`lora_fx.lora_state_dict` returns it, e.g.
    ``"layers.0.fc.lora.default.weight.lora_A"`` (keys of a compiled or DDP-wrapped model, with
    ``_orig_mod.`` / ``module.`` parts, load too); when it holds one adapter, its adapter-name
    segment may be another name (it is replaced by ``adapter``).  A tied weight's adapter may be
    given under any of its owners' paths (several must hold the same values).  DoRA adapters also
    need their ``lora_magnitude: (fan_out,)``; base parameters trained in full with the adapter
    (``trainable=``) may be given too.  For every adapter: ``lora_A: (r', fan_in)``,
    ``lora_B: (fan_out, r')`` with ``r'`` at most the adapter's capacity ``lora_A.shape[0]`` (see
    :func:`reserve_rank_`); a smaller ``r'`` is zero-padded and the adapter's logical ``rank``
    becomes ``r'``.  Values are cast to the factors' dtype and device when the cast is exact.

    Args:
        gm: a module from :func:`lora_fx.transform` (or a compiled / DDP wrapper of one).
        state: the factors to load; every adapter named ``adapter`` must get both factors.
        adapter: the adapter to load into.
        alpha: ``None`` keeps each adapter's ``alpha``; a float sets it for all; a mapping
            ``{fnmatch pattern over adapter module path: alpha}`` sets it per adapter.
            ``scaling = alpha / rank`` (``/ sqrt(rank)`` with rsLoRA) is refreshed in place.

    Returns:
        ``gm``.

    Raises:
        AdapterMismatchError: listing every missing key, unexpected key, wrong shape (fan-in,
            fan-out, rank above capacity), wrong dtype and inf/nan value; nothing is written when
            any is found (the contract of :mod:`lora_fx.io._files`).
        UnknownAdapterError: no adapter named ``adapter`` (also a NotAdaptedError).
    """
    select_adapters(gm, adapter, what="load_adapter_values_")
    target = unwrap(gm)
    own = {plain_name(k): v for k, v in target.state_dict(keep_vars=True).items()}
    mods = {p: a for p, (n, a) in adapter_modules(target).items() if n == adapter}
    given = plain_keys(state, own)
    names = {n for n in map(_adapter_name_of, given) if n is not None}
    if len(names) == 1 and adapter not in names:
        given = {(_renamed(k, adapter) if _adapter_name_of(k) else k): v for k, v in given.items()}
    expected: dict[str, Entry] = {}
    groups: dict[int, list[str]] = {}
    for path, a in mods.items():
        groups.setdefault(id(a), []).append(path)
        fused = getattr(a, "blocks", None) is not None
        for attr, axis in (("lora_A", 0), ("lora_B", 1), ("lora_magnitude", None)):
            t = getattr(a, attr, None)
            if isinstance(t, torch.Tensor):
                expected[f"{path}.{attr}"] = Entry(tuple(t.shape), t.dtype, required=False,
                                                   rank_axis=None if fused else axis)
    for k in trainable_params(target, [adapter]):
        if k in own:
            expected[k] = Entry(tuple(own[k].shape), own[k].dtype, required=False)
    problems = entry_problems(given, expected, unexpected_why=lambda k: f"no adapter '{adapter}' there")
    plan = []
    for paths in groups.values():
        a = mods[paths[0]]
        attrs = ("lora_A", "lora_B") + (("lora_magnitude",) if getattr(a, "lora_magnitude", None) is not None else ())
        values = {}
        for attr in attrs:
            found = [p for p in paths if f"{p}.{attr}" in given]
            if not found:
                also = f" (or {[f'{p}.{attr}' for p in paths[1:]]})" if len(paths) > 1 else ""
                what = " (DoRA magnitude)" if attr == "lora_magnitude" else ""
                problems.append(f"missing key {f'{paths[0]}.{attr}'!r}{what}{also}")
                continue
            values[attr] = given[f"{found[0]}.{attr}"]
            problems += [f"{f'{p}.{attr}'!r} and {f'{found[0]}.{attr}'!r} name one tied adapter but hold different "
                         "values" for p in found[1:] if not torch.equal(given[f"{p}.{attr}"], values[attr])]
        va, vb = values.get("lora_A"), values.get("lora_B")
        if va is not None and vb is not None:
            if getattr(a, "blocks", None) is None and va.ndim == 2 and vb.ndim == 2 and va.shape[0] != vb.shape[1]:
                problems.append(f"{paths[0]}: lora_A has rank {va.shape[0]}, lora_B has rank {vb.shape[1]}")
            plan.append((paths[0], a, values))
    if problems:
        raise mismatch_error(f"cannot load adapter values into '{adapter}' of {type(target).__name__}", problems)
    with torch.no_grad(), Rollback() as undo:
        for path, a, values in plan:
            undo.attrs(a, ADAPTER_STATE)
            for attr in values:
                undo.tensor(getattr(a, attr))
            va, vb = values["lora_A"], values["lora_B"]
            r = va.shape[0]
            a.lora_A[:r].copy_(va)
            a.lora_A[r:].zero_()
            a.lora_B[:, :r].copy_(vb)
            a.lora_B[:, r:].zero_()
            if "lora_magnitude" in values:
                a.lora_magnitude.copy_(values["lora_magnitude"])
            if getattr(a, "blocks", None) is None:
                a.rank = int(r)
            if isinstance(alpha, Mapping):
                hit = next((v for p, v in alpha.items() if fnmatch.fnmatchcase(path, p)), None)
                if hit is not None:
                    a.alpha = float(hit)
            elif alpha is not None:
                a.alpha = float(alpha)
            a.refresh_scaling_()
        for k in trainable_params(target, [adapter]):
            if k in given:
                undo.tensor(own[k]).copy_(given[k].to(own[k].dtype))
    return gm


def reserve_rank_(gm: nn.Module, max_rank: int, *, adapter: str = "default") -> nn.Module:
    """Zero-pad every adapter named ``adapter`` to ``max_rank`` rows of ``lora_A`` / columns of
    ``lora_B``, so adapters of any rank up to ``max_rank`` can later be loaded with
    :func:`load_adapter_values_` without changing shapes (no recompilation under
    ``torch.compile``).  The outputs do not change (the padding is zero, the logical ``rank`` and
    ``scaling`` stay), and training stays exactly rank-``r``: the padding gets zero gradients.

    Call it **before** ``torch.compile`` and before building the optimizer: it replaces the factor
    ``Parameter`` objects (new shapes).  State dicts then hold padded factors.

    Args:
        gm: a module from :func:`lora_fx.transform`.
        max_rank: capacity, at least every adapter's current capacity.
        adapter: adapter name.

    Returns:
        ``gm``.

    Raises:
        ConfigError: ``max_rank`` is not a positive int or is below an adapter's capacity, or an
            adapter is fused (per-block factors; not padded).
        UnknownAdapterError: no adapter named ``adapter`` (also a NotAdaptedError).
    """
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank <= 0:
        raise ConfigError(f"max_rank must be a positive int, got {max_rank!r}")
    chosen = select_adapters(gm, adapter, what="reserve_rank_")
    fused = [p for p, a in chosen if getattr(a, "blocks", None) is not None]
    if fused:
        raise ConfigError(f"reserve_rank_ pads plain adapters only; {fused} are fused (per-block q/k/v factors). "
                          "Transform with fused={'<pattern>': None} for one plain adapter per weight, or exclude them.")
    small = [f"{p} (capacity {a.lora_A.shape[0]})" for p, a in chosen if a.lora_A.shape[0] > max_rank]
    if small:
        need = max(a.lora_A.shape[0] for _, a in chosen)
        raise ConfigError(f"max_rank {max_rank} is below the capacity of: {', '.join(small)}; pass max_rank >= {need} "
                          "(reserve_rank_ only pads)")
    with torch.no_grad():
        for _, a in chosen:
            cap = a.lora_A.shape[0]
            if cap == max_rank:
                continue
            A = a.lora_A.new_zeros(max_rank, a.lora_A.shape[1])
            B = a.lora_B.new_zeros(a.lora_B.shape[0], max_rank)
            A[:cap] = a.lora_A
            B[:, :cap] = a.lora_B
            a.lora_A = nn.Parameter(A, requires_grad=a.lora_A.requires_grad)
            a.lora_B = nn.Parameter(B, requires_grad=a.lora_B.requires_grad)
    return gm
