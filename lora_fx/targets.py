"""Target selection: which consumed parameters an adapter goes on, the checks of the patterns that
name them, and the check of an adapter's name."""

from __future__ import annotations

import fnmatch
from typing import Optional, Sequence

from .config import LoraConfig
from torch import nn

from .errors import ConfigError, TargetError, UnsupportedSiteError
from .state import is_adapter_path

__all__ = ["select_targets", "select_trainable", "check_patterns", "check_adapter_name"]


def select_targets(consumers: Sequence, targets: Optional[Sequence[str]], exclude: Optional[Sequence[str]]) -> list:
    """The consumers (:class:`~lora_fx.passes.find_sites.Consumer`) to adapt, in graph order.

    ``targets=None`` takes every default site (a weight of a known weight-consuming op); otherwise
    the consumers whose fully qualified parameter name matches a pattern (fnmatch), each once.
    ``exclude`` patterns are removed afterwards (exclude wins).

    Raises:
        TargetError: an empty ``targets``, a pattern matching nothing, or nothing left to adapt
            (the message lists the candidates).
        UnsupportedSiteError: a pattern names only parameters that cannot be adapted, or names one
            exactly (the message gives the reason).
    """
    names = sorted({c.fqn for c in consumers})
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    if targets is not None and not targets:
        raise TargetError("targets is empty, so nothing would be adapted; pass targets=None to adapt every "
                          f"supported weight, or name some. Candidates: {shown}")
    if targets is None:
        chosen = [c for c in consumers if c.default]
    else:
        chosen, seen = [], set()
        for pat in targets:
            hit = [c for c in consumers if fnmatch.fnmatchcase(c.fqn, pat)]
            if not hit:
                raise TargetError(f"targets pattern {pat!r} matches no parameter consumed by the model's "
                                  f"forward. Candidates: {shown}")
            bad = [c for c in hit if c.reason is not None]
            if bad and (len(bad) == len(hit) or not any(ch in pat for ch in "*?[")):
                c = bad[0]
                raise UnsupportedSiteError(
                    f"cannot adapt '{c.fqn}' (used by {c.op}): {c.reason}. Remove it from targets, or "
                    "target a weight matrix instead.")
            new = [c for c in hit if c.reason is None and id(c) not in seen]  # O(n): no list scans
            seen.update(id(c) for c in new)
            chosen.extend(new)
    if exclude is not None:
        for pat in exclude:
            if not any(fnmatch.fnmatchcase(c.fqn, pat) for c in consumers):
                raise TargetError(f"exclude pattern {pat!r} matches no parameter consumed by the model's "
                                  f"forward. Candidates: {shown}")
        chosen = [c for c in chosen if not any(fnmatch.fnmatchcase(c.fqn, p) for p in exclude)]
    if not chosen:
        raise TargetError("no site to adapt: " + (
            "the model has no supported weight (linear, conv, conv_transpose, embedding, matmul, "
            f"attention). Name parameters explicitly with targets=[...]. Candidates: {shown}"
            if targets is None else f"exclude removed every target. Candidates: {shown}"))
    return chosen


def select_trainable(root: nn.Module, patterns: Optional[Sequence[str]]) -> list[str]:
    """Names of the base parameters of ``root`` that ``patterns`` (``LoraConfig.trainable``) select:
    a parameter is selected when its name, or the name of a module holding it, matches a pattern
    (fnmatch); every name of a tied parameter is checked, each selected name listed once.

    Raises:
        TargetError: a pattern matches no module or parameter (the message lists candidates).
        UnsupportedSiteError: a selected parameter is not floating point (it cannot train).
    """
    if not patterns:
        return []
    names = [(n, p) for n, p in root.named_parameters(remove_duplicate=False) if not is_adapter_path(n)]

    def owners(name: str) -> list[str]:
        parts = name.split(".")
        return [".".join(parts[:i]) for i in range(1, len(parts))] + [name]

    out = []
    for pat in patterns:
        hit = [n for n, _ in names if any(fnmatch.fnmatchcase(o, pat) for o in owners(n))]
        if not hit:
            mods = sorted({o for n, _ in names for o in owners(n)[:-1]})
            raise TargetError(f"trainable pattern {pat!r} matches no module or parameter of the model. Modules: "
                              f"{', '.join(mods[:40])}{' ...' if len(mods) > 40 else ''}")
        out += [n for n in hit if n not in out]
    bad = [n for n, p in names if n in out and not p.is_floating_point()]
    if bad:
        raise UnsupportedSiteError(f"trainable selects parameters that are not floating point and cannot train: {bad}; "
                                   "narrow the trainable patterns")
    return out


def check_patterns(config: LoraConfig, chosen: Sequence) -> None:
    """Every ``rank_pattern`` / ``alpha_pattern`` / ``fused`` key of ``config`` matches a chosen site.

    Raises:
        TargetError: naming the key and the targeted parameters.
    """
    for what, patterns in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern),
                           ("fused", config.fused)):
        for pat in patterns:
            if not any(fnmatch.fnmatchcase(c.fqn, pat) for c in chosen):
                raise TargetError(f"{what} key {pat!r} matches no targeted parameter; targeted: "
                                  f"{sorted({c.fqn for c in chosen})}")


def check_adapter_name(name) -> str:
    """``name`` if it can name an adapter (a non-empty identifier: it becomes a module path part).

    Raises:
        ConfigError: otherwise."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"adapter name must be a non-empty Python identifier (it becomes part of parameter "
                          f"names like 'fc.lora.<name>.weight.lora_A'), got {name!r}")
    return name
