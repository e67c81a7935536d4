"""Checkpoint conversion between loralib / LoRA-Torch adapter state dicts and models adapted by
:func:`lora_fx.transform`, both ways, with the same outputs.

Key layouts read and written (see :mod:`lora_fx.nn.layout` for the factor shapes):

======================  ==========================  ==========================================
library                 key                         base parameter in the transformed model
======================  ==========================  ==========================================
loralib                 ``<module>.lora_A/B``       ``<module>.weight``
LoRA-Torch              ``<module>.w_lora_A/B``     ``<module>.weight``
LoRA-Torch MHA          ``<mha>.<qkv>_lora_A/B``    ``<mha>.in_proj_weight`` (``qkv``, ``qv``, ...)
LoRA-Torch MHA          ``<mha>.q_lora_A/B``        ``<mha>.q_proj_weight`` (separate projections)
LoRA-Torch MHA          ``<mha>.o_lora_A/B``        ``<mha>.out_proj.weight``
======================  ==========================  ==========================================

loralib does not store ``r`` or ``lora_alpha``: ``r`` is read from the shapes, ``lora_alpha`` must be
given.  Scaling differences (``lora_alpha / r`` there, the adapter's ``alpha / rank`` here) are
absorbed into ``lora_B``; a factor pair of smaller rank than the adapter is zero padded.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import AdapterMismatchError, ConfigError
from ..nn import layout
from ..state import is_adapter_path, is_lora_key, unwrap
from ..site_view import sites
from ._files import Rollback, dtype_problem, mismatch_error, plain_keys
from .state_dict import lora_state_dict

__all__ = ["load_loralib_state_dict", "loralib_state_dict"]

Alpha = Union[float, Mapping[str, float]]


def _split_key(key: str) -> Optional[tuple[str, str, str]]:
    """``"a.b.qkv_lora_B"`` → ``("a.b", "qkv", "B")``; None for a key that is not a LoRA factor."""
    prefix, _, last = key.rpartition(".")
    for ab in ("A", "B"):
        if last == f"lora_{ab}":
            return prefix, "", ab
        if last.endswith(f"_lora_{ab}"):
            return prefix, last[: -len(f"_lora_{ab}")], ab
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _candidates(prefix: str, tag: str) -> list[str]:
    if tag in ("", "w"):
        return [_join(prefix, "weight")]
    if tag == "o":
        return [_join(prefix, "out_proj.weight")]
    if tag in ("q", "k", "v"):
        return [_join(prefix, f"{tag}_proj_weight"), _join(prefix, "in_proj_weight")]
    if tag and all(c in "qkv" for c in tag):
        return [_join(prefix, "in_proj_weight")]
    return []


def _match(patterns: Union[None, Mapping, Sequence[str]], name: str):
    if not patterns:
        return None
    items = patterns.items() if isinstance(patterns, Mapping) else ((p, True) for p in patterns)
    for pat, value in items:
        if fnmatch.fnmatchcase(name, pat):
            return value
    return None


def _alpha_for(lora_alpha: Optional[Alpha], prefix: str, default: Optional[float], key: str) -> float:
    if isinstance(lora_alpha, Mapping):
        value = _match(lora_alpha, prefix)
        if value is None:
            value = default
    else:
        value = lora_alpha if lora_alpha is not None else default
    if value is None or not float(value) > 0:
        raise ConfigError(f"no valid lora_alpha for '{key}' (got {value!r}): pass lora_alpha=<float> or a "
                          f"{{module pattern: float}} dict covering '{prefix}'")
    return float(value)


def _conv_geometry(owner: nn.Module, param: str):
    if isinstance(owner, nn.modules.conv._ConvNd) and not isinstance(owner, nn.modules.conv._ConvTransposeNd):
        ks = tuple(owner.kernel_size)
        if any(k != ks[0] for k in ks):
            raise AdapterMismatchError(f"'{param}': loralib's conv layout needs a cubic kernel, got {ks}")
        return ks[0], owner.groups, len(ks)
    return None


def _owner(gm: nn.Module, param: str) -> nn.Module:
    path = param.rpartition(".")[0]
    return gm.get_submodule(path) if path else gm


def _to_ours(gm, site, key, tag, a, b, enable_lora, fan_in_fan_out):
    """(A', B', r) in our layout for loralib / LoRA-Torch factors ``a``, ``b`` of ``site``."""
    shape = site.shape
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    prefix = key.rpartition(".")[0]
    geo = _conv_geometry(_owner(gm, site.param), site.param)
    if geo is not None:
        k, g, nd = geo
        in_ch = shape[1] * g
        if a.shape[1] == in_ch * k ** (nd - 1) and b.shape[0] == fan_out // g * k and b.shape[1] % k == 0:
            if layout.conv_chunks(shape, k, g) == 0:
                raise AdapterMismatchError(f"'{key}': groups={g} does not divide kernel size {k}, so loralib's "
                                           "conv update has no exact lora_fx layout")
            a2, b2 = layout.conv_to_ours(a, b, shape, k, g)
            return a2, b2, b.shape[1] // k
    if site.op == "embedding" and tag == "":  # loralib: A (r, num), B (dim, r), ΔW = (B@A)ᵀ
        if a.shape[1] == fan_out and b.shape[0] == fan_in:
            a2, b2 = layout.transposed(a, b)
            return a2, b2, a.shape[0]
    r = b.shape[1]
    transposed = bool(_match(fan_in_fan_out, prefix))
    if not transposed and a.shape == (r, fan_in) and b.shape == (fan_out, r):
        return a, b, r
    if a.shape == (r, fan_out) and b.shape == (fan_in, r):  # fan_in_fan_out: W stored (in, out)
        a2, b2 = layout.transposed(a, b)
        return a2, b2, r
    if a.shape[1] == fan_in and r > 0 and a.shape[0] % r == 0 and b.shape[0] % (a.shape[0] // r) == 0:
        n_on = a.shape[0] // r
        d = b.shape[0] // n_on
        if fan_out % d == 0:  # MergedLinear
            enable = _match(enable_lora, prefix)
            if enable is None:
                if n_on != fan_out // d:
                    raise AdapterMismatchError(
                        f"'{key}' is a MergedLinear factor with {n_on} of {fan_out // d} blocks enabled; say which "
                        f"with enable_lora={{'{prefix}': [True, False, ...]}}")
                enable = [True] * n_on
            enable = [bool(e) for e in enable]
            if sum(enable) != n_on or len(enable) * d != fan_out:
                raise AdapterMismatchError(f"'{key}': enable_lora={enable} does not fit lora_A {tuple(a.shape)}, "
                                           f"lora_B {tuple(b.shape)} and weight {tuple(shape)}")
            return a, layout.merged_B(b, enable, r), r
    raise AdapterMismatchError(f"'{key}': lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} fit no loralib layout "
                               f"of '{site.param}' {tuple(shape)} (op {site.op})")


def _fused_problem(site) -> Optional[str]:
    if site.blocks:
        return (f"'{site.param}' has a fused per-block adapter ({', '.join(b[0] for b in site.blocks)}); loralib / "
                "LoRA-Torch layouts hold one rank-r pair per weight. Transform with "
                f"fused={{'{site.param}': None}} (or fused={{'*.in_proj_weight': None}} for attention) to use them.")
    return None


@torch.no_grad()
def load_loralib_state_dict(
    gm: nn.Module,
    state_dict: Mapping[str, Tensor],
    *,
    lora_alpha: Alpha,
    enable_lora: Optional[Mapping[str, Sequence[bool]]] = None,
    fan_in_fan_out: Sequence[str] = (),
    adapter_name: str = "default",
    strict: bool = True,
) -> nn.Module:
    """Load a loralib / LoRA-Torch adapter state dict (from ``lora.lora_state_dict(model)``) into the
    adapters of ``gm`` (a :func:`lora_fx.transform` result of the same base model), so that ``gm``
    computes what the loralib model computes.  Returns ``gm``.

    Each pair ``A, B`` is mapped to lora_fx's layout ``A' (R, W[0].numel())``, ``B' (W.shape[0], R)``
    exactly (:mod:`lora_fx.nn.layout`): Linear as is; loralib Embedding transposed; MergedLinear as a
    block matrix with zero rows for disabled blocks (``R = r·n_on``); Conv ``R = r·k·k/groups``.
    ``B'`` is multiplied by ``(lora_alpha / r) / adapter scaling`` and zero padded to the adapter's
    rank.  Other keys (biases saved with ``bias="all"``; loralib conv's ``conv.bias``) are copied to
    the matching base entries.  Nothing is written unless every key fits.

    Args:
        gm: adapted model; state_dict: loralib-style keys (see the module docstring).
        lora_alpha: loralib's ``lora_alpha`` (one float, or ``{module pattern: float}``).
        enable_lora: ``{module pattern: [bool, ...]}`` for MergedLinear keys whose enabled blocks
            cannot be read from the shapes (not all enabled).
        fan_in_fan_out: module patterns whose square weights were adapted with ``fan_in_fan_out=True``
            (non-square ones are detected from the shapes).
        adapter_name: the adapter to fill.
        strict: every adapter of ``adapter_name`` must receive a key.

    Raises:
        AdapterMismatchError: a key names no adapted parameter, its shapes fit no layout, the adapter's
            rank is too small (the message gives the rank needed), or (``strict``) an adapter gets no key.
        ConfigError: no usable ``lora_alpha`` for a key.

    The contract of every loader (:mod:`lora_fx.io._files`): missing, unexpected, wrong-shape and
    wrong-dtype keys and inf/nan values all in one error, nothing written then; ``gm`` may be
    compiled or DDP-wrapped, and keys with ``_orig_mod.`` / ``module.`` parts load.
    """
    given, gm = gm, unwrap(gm)
    state_dict = plain_keys(state_dict, gm.state_dict())
    by_name, errors = {}, []
    for s in sites(gm):
        if s.adapter == adapter_name:
            fused = _fused_problem(s)
            if fused:
                errors.append(fused)
                continue
            for n in s.aliases or (s.param,):
                by_name[n] = s
    pairs: dict[tuple[str, str], dict[str, Tensor]] = {}
    others = {}
    for key, value in state_dict.items():
        parts = _split_key(key)
        if parts is None:
            others[key] = value
        else:
            pairs.setdefault(parts[:2], {})[parts[2]] = value
    base_sd = gm.state_dict()
    writes: list[tuple[nn.Parameter, Tensor]] = []
    covered = set()
    for (prefix, tag), ab in pairs.items():
        key = _join(prefix, f"{tag}_lora_A" if tag else "lora_A")
        site = next((by_name[c] for c in _candidates(prefix, tag) if c in by_name), None)
        if site is not None:
            covered.add(site.path)  # a problem with its keys is reported once, not as missing too
        if set(ab) != {"A", "B"}:
            have = key if "A" in ab else key[:-1] + "B"
            errors.append(f"missing key {have[:-1] + ('B' if 'A' in ab else 'A')!r} (its pair {have!r} is present; "
                          "both factors are needed)")
            continue
        if site is None:
            errors.append(f"unexpected key '{key}' (no adapted parameter among "
                          f"{_candidates(prefix, tag) or ['(unknown key form)']} for adapter '{adapter_name}')")
            continue
        bad = [p for p in (dtype_problem(key, ab["A"], site.lora_A.dtype),
                           dtype_problem(key[:-1] + "B", ab["B"], site.lora_B.dtype)) if p]
        errors += bad
        try:
            a, b, r = _to_ours(gm, site, key, tag, ab["A"], ab["B"], enable_lora, fan_in_fan_out)
            s_l = _alpha_for(lora_alpha, prefix, None, key) / r
        except (AdapterMismatchError, ConfigError) as exc:
            errors.append(str(exc))
            continue
        if bad:
            continue
        ad = site.module
        if a.shape[0] > ad.rank:
            errors.append(f"'{key}' is a rank-{a.shape[0]} update of '{site.param}' in lora_fx's layout, but its "
                          f"adapter has rank {ad.rank}: transform with rank_pattern={{'{site.param}': {a.shape[0]}}}")
            continue
        s_t = ad.base_scaling * ad.mix
        a, b = layout.pad_rank(a.float(), b.float() * (s_l / s_t), ad.rank)
        writes += [(ad.lora_A, a), (ad.lora_B, b)]
    for key, value in others.items():
        alt = key.replace(".conv.", ".") if ".conv." in key else None
        target = key if key in base_sd else alt if alt in base_sd else None
        if target is None:
            errors.append(f"unexpected key '{key}' (not a LoRA factor and not an entry of the model's state_dict)")
        elif tuple(base_sd[target].shape) != tuple(value.shape):
            errors.append(f"'{key}': file has shape {tuple(value.shape)}, model has {tuple(base_sd[target].shape)} "
                          f"('{target}')")
        elif dtype_problem(key, value, base_sd[target].dtype):
            errors.append(dtype_problem(key, value, base_sd[target].dtype))
        else:
            writes.append((base_sd[target], value))
    if strict:
        missing = sorted({s.param for s in by_name.values() if s.path not in covered})
        errors += [f"missing key {_join(p.rpartition('.')[0], 'lora_A')!r} / 'lora_B' (no checkpoint key for the adapter "
                   f"of '{p}'; pass strict=False to keep it)" for p in missing]
    if errors:
        raise mismatch_error(f"loralib checkpoint does not fit {type(gm).__name__}", errors)
    with Rollback() as undo:
        for dst, src in writes:
            undo.tensor(dst).copy_(src.to(dst.dtype))
    return given


@torch.no_grad()
def loralib_state_dict(
    gm: nn.Module,
    *,
    style: str = "loralib",
    lora_alpha: Optional[Alpha] = None,
    enable_lora: Optional[Mapping[str, Sequence[bool]]] = None,
    fan_in_fan_out: Sequence[str] = (),
    adapter_name: str = "default",
    bias: str = "none",
) -> dict[str, Tensor]:
    """The adapters of ``gm`` as a loralib (``style="loralib"``) or LoRA-Torch (``"loratorch"``)
    adapter state dict: load it with ``load_state_dict(sd, strict=False)`` into the model written
    with loralib / LoRA-Torch / :mod:`lora_fx.nn` layers at rank ``r`` and ``lora_alpha`` and it
    computes what ``gm`` computes.

    ``r`` of each layer is the adapter's rank (loralib Conv with ``groups=g``: ``ceil(rank / g)``).
    Factors are exact re-layouts (:mod:`lora_fx.nn.layout`); the scaling ratio is folded into ``B``.

    Args:
        style: ``"loralib"`` (keys ``<module>.lora_A``) or ``"loratorch"`` (``<module>.w_lora_A``,
            ``<mha>.qkv_lora_A`` / ``o_lora_A``).
        lora_alpha: the ``lora_alpha`` the receiving layers use (float or ``{module pattern: float}``);
            default: each adapter's ``alpha``.
        enable_lora: ``{module pattern: [bool, ...]}``: export those Linear adapters as MergedLinear.
        fan_in_fan_out: module patterns of receiving layers built with ``fan_in_fan_out=True``.
        bias: also return biases, as :func:`lora_fx.lora_state_dict`.

    Raises:
        AdapterMismatchError: an adapter has no loralib layout (a parameter other than ``.weight``
            in ``style="loralib"``, a non-cubic or grouped kernel that does not fit, an update on a
            disabled MergedLinear block).
        ConfigError: unknown ``style``.
    """
    if style not in ("loralib", "loratorch"):
        raise ConfigError(f"style must be 'loralib' or 'loratorch', got {style!r}")
    gm = unwrap(gm)
    out: dict[str, Tensor] = {}
    errors = []
    conv_owners = set()
    for site in sites(gm):
        if site.adapter != adapter_name:
            continue
        fused = _fused_problem(site)
        if fused:
            errors.append(fused)
            continue
        owner_path, _, pname = site.param.rpartition(".")
        owner = _owner(gm, site.param)
        parent_path, _, last = owner_path.rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        if pname == "weight" and last == "out_proj" and isinstance(parent, nn.MultiheadAttention):
            prefix, tag = parent_path, "o"
        elif pname == "weight":
            prefix, tag = owner_path, "w"
        elif pname == "in_proj_weight":
            prefix, tag = owner_path, "qkv"
        elif pname in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            prefix, tag = owner_path, pname[0]
        else:
            errors.append(f"'{site.param}': neither loralib nor LoRA-Torch has a layer adapting '{pname}'")
            continue
        if style == "loralib" and tag != "w":
            errors.append(f"'{site.param}': loralib has no MultiheadAttention; use style='loratorch'")
            continue
        a, b = site.lora_A.detach().float(), site.lora_B.detach().float()
        r_l = a.shape[0]
        key_a = _join(prefix, "lora_A" if style == "loralib" else f"{tag}_lora_A")
        try:
            geo = _conv_geometry(owner, site.param)
            enable = _match(enable_lora, prefix)
            if geo is not None:
                k, g, _ = geo
                a, b, r_l = layout.conv_from_ours(a, b, site.shape, k, g)
                conv_owners.add(owner_path)
            elif site.op == "embedding" and style == "loralib":
                a, b = layout.transposed(a, b)
            elif enable is not None:
                enable = [bool(e) for e in enable]
                d = site.shape[0] // len(enable)
                off = torch.cat([b[i * d:(i + 1) * d] for i, e in enumerate(enable) if not e] or [b[:0]])
                if off.numel() and bool((off @ a).any()):
                    raise AdapterMismatchError(f"'{site.param}' has a non-zero update on blocks disabled by "
                                               f"enable_lora={enable}")
                a, b = layout.merged_from_ours(a, b, enable)
            elif _match(fan_in_fan_out, prefix):
                a, b = layout.transposed(a, b)
            s_l = _alpha_for(lora_alpha, prefix, site.module.alpha, key_a) / r_l
        except (AdapterMismatchError, ConfigError, ValueError) as exc:
            errors.append(f"'{site.param}': {exc}")
            continue
        b = b * (site.scaling / s_l)
        dtype = site.lora_A.dtype
        out[key_a] = a.to(dtype).contiguous()
        out[key_a[:-1] + "B"] = b.to(dtype).contiguous()
    if errors:
        raise mismatch_error(f"{type(gm).__name__}'s adapters have no loralib layout", errors,
                             outcome="nothing was exported")
    for key, value in lora_state_dict(gm, bias=bias).items():
        if is_lora_key(key) or is_adapter_path(key):
            continue
        owner_path = key.rpartition(".")[0]
        if style == "loralib" and owner_path in conv_owners:
            key = _join(owner_path, "conv." + key.rpartition(".")[2])
        out[key] = value
    return out
