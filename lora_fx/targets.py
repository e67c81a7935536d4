"""Target selection: which consumed parameters an adapter goes on, the checks of the patterns that
name them, and the check of an adapter's name.

The default-target policy lives here too.  The graph shows which op consumes each weight
(:mod:`lora_fx.passes.find_sites`, one reason per consumer that is not a default target); some
facts only the user's model shows, read before capture by :func:`target_policy`:

* a Hugging Face transformers ``PreTrainedModel``'s input embeddings (``get_input_embeddings()``),
  output head (``get_output_embeddings()``), other embedding tables and mixture-of-experts
  routers are **not default targets** (the choice of PEFT's ``target_modules="all-linear"``); naming them in ``targets``
  adapts them;
* weights stored behind a parametrization (``torch.nn.utils.parametrize``: ``weight_norm``,
  ``spectral_norm``, ``orthogonal``, ...; or the deprecated hook-based ``torch.nn.utils.weight_norm``
  / ``spectral_norm``) **cannot be adapted**: the op consumes the parametrization's output, and
  adding ``ΔW`` to the stored tensor would not make the op see ``W + ΔW``.

:func:`find_left_out` then lists every weight-like parameter (floating point, at least 2-D) an adapter
does not adapt, with the reason.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, replace
from typing import Mapping, Optional, Sequence

from torch import nn

from . import weights
from .config import LoraConfig
from .errors import ConfigError, TargetError, UnsupportedSiteError
from .state import KEPT_ATTR, REGION_ATTR, LeftOut, is_adapter_path, policy_of

__all__ = ["select_targets", "select_trainable", "check_patterns", "check_adapter_name", "TargetPolicy",
           "target_policy", "apply_policy", "find_left_out"]

_NOT_DEFAULT = "target it by name to adapt it"
#: module kinds whose weights are not default targets of a transformers model (PEFT's all-linear)
_NOT_ALL_LINEAR = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class TargetPolicy:
    """What the user's model says about its weights beyond the graph (:func:`target_policy`).

    Attributes:
        not_default: ``{parameter name: reason}``: adaptable, but not a default target.
        refused: ``{parameter name: reason}``: cannot be adapted (the reason gives the fix).
        names: ``{name: reason}`` of tensors that are not parameters but are computed from
            refused ones (``"fc.weight"`` of a parametrized ``fc``), so naming them is answered
            with the reason.
    """

    not_default: Mapping[str, str] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)
    names: Mapping[str, str] = field(default_factory=dict)


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _module_params(model: nn.Module, module: Optional[nn.Module], aliases: dict[int, list[str]]) -> list[str]:
    """Every name (all aliases) of the parameters ``module`` holds directly."""
    if not isinstance(module, nn.Module):
        return []
    return [n for p in module.parameters(recurse=False) for n in aliases.get(id(p), [])]


def _is_pretrained(model: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" for c in type(model).__mro__)


def _call(model: nn.Module, method: str) -> Optional[nn.Module]:
    fn = getattr(model, method, None)
    try:
        return fn() if callable(fn) else None
    except (NotImplementedError, AttributeError, TypeError):
        return None


def _routers(model: nn.Module, aliases: dict[int, list[str]]) -> dict[str, str]:
    """Mixture-of-experts routers, found by structure: a module with a child holding stacked expert
    weights (3-D parameters whose first dimension is the number of experts ``E``) or a
    ``ModuleList`` of ``E`` experts, and another child whose 2-D weight has ``E`` rows (the gate
    feeding top-k; transformers' ``*TopKRouter``, or an ``nn.Linear(hidden, E)`` named ``gate``)."""
    out = {}
    for path, m in model.named_modules():
        children = dict(m.named_children())
        experts: dict[str, set[int]] = {}
        for name, c in children.items():
            sizes = {p.shape[0] for p in c.parameters(recurse=False) if p.ndim == 3}
            if isinstance(c, nn.ModuleList) and len(c) >= 2 and all(any(True for _ in e.parameters()) for e in c):
                sizes.add(len(c))
            if sizes:
                experts[name] = sizes
        if not experts:
            continue
        for name, c in children.items():
            if name in experts:
                continue
            n_experts = set().union(*(v for k, v in experts.items() if k != name))
            for pname, p in c.named_parameters(recurse=False):
                if p.ndim == 2 and p.is_floating_point() and p.shape[0] in n_experts and p.shape[0] >= 2:
                    where = f"{path}.{name}" if path else name
                    for alias in aliases.get(id(p), []):
                        out[alias] = (f"not a default target: the mixture-of-experts router '{where}' "
                                      f"({type(c).__name__}, {p.shape[0]} experts), left out as by PEFT's all-linear; "
                                      f"{_NOT_DEFAULT}")
    return out


_PARAMETRIZED = re.compile(r"(?:^|\.)parametrizations\.([^.]+)\.original\d*$")


def _parametrized(model: nn.Module, aliases: dict[int, list[str]]) -> tuple[dict[str, str], dict[str, str]]:
    """``({parameter name: reason}, {computed tensor name: reason})`` for weights behind
    parametrizations (``torch.nn.utils.parametrize``) or the deprecated weight-norm /
    spectral-norm hooks."""
    refused, names = {}, {}
    for path, m in model.named_modules():
        where = f"'{path}'" if path else "the root"
        prefix = f"{path}." if path else ""
        plists = getattr(m, "parametrizations", None)
        if isinstance(plists, nn.ModuleDict):
            for tensor, plist in plists.items():
                kinds = ", ".join(type(f).__name__.lstrip("_") for f in plist)
                why = (f"'{prefix}{tensor}' of {where} ({type(m).__name__}) is computed by a parametrization "
                       f"({kinds}, torch.nn.utils.parametrize): its op consumes the parametrization's output, so an "
                       "adapter on the stored tensor would not give W + ΔW. Remove the parametrization before "
                       f"transform: torch.nn.utils.parametrize.remove_parametrizations(model.get_submodule("
                       f"'{path}'), '{tensor}') keeps its current value as a plain parameter")
                names[f"{prefix}{tensor}"] = why
                for p in plist.parameters():
                    for alias in aliases.get(id(p), []):
                        refused[alias] = why
        for hook in m._forward_pre_hooks.values():
            kind = type(hook).__name__
            if kind not in ("WeightNorm", "SpectralNorm") or not isinstance(getattr(hook, "name", None), str):
                continue
            stored = ("_g", "_v") if kind == "WeightNorm" else ("_orig",)
            undo = "remove_weight_norm" if kind == "WeightNorm" else "remove_spectral_norm"
            why = (f"'{prefix}{hook.name}' of {where} ({type(m).__name__}) is recomputed by a {kind} forward pre-hook "
                   f"(torch.nn.utils.{'weight_norm' if kind == 'WeightNorm' else 'spectral_norm'}): an adapter on "
                   f"the stored tensors would not give W + ΔW. Remove it before transform: "
                   f"torch.nn.utils.{undo}(model.get_submodule('{path}'), '{hook.name}')")
            names[f"{prefix}{hook.name}"] = why
            for suffix in stored:
                p = m._parameters.get(hook.name + suffix)
                for alias in aliases.get(id(p), []) if p is not None else []:
                    refused[alias] = why
    return refused, names


def target_policy(model: nn.Module) -> TargetPolicy:
    """The default-target policy of ``model`` (the user's model, read only; see the module docstring).

    For a transformers ``PreTrainedModel`` root, the parameters of ``get_input_embeddings()``,
    ``get_output_embeddings()``, of every other embedding table and of mixture-of-experts routers
    are not default targets (every name of a tied parameter: what PEFT's
    ``target_modules="all-linear"`` leaves out; convolutions stay default targets); for any other model every supported site stays a default target.
    On every model, weights behind parametrizations are refused."""
    aliases = _aliases(model)
    not_default: dict[str, str] = {}
    if _is_pretrained(model):
        for method, what in (("get_input_embeddings", "input embeddings"), ("get_output_embeddings", "output head")):
            mod = _call(model, method)
            for name in _module_params(model, mod, aliases):
                not_default.setdefault(name, f"not a default target: a transformers model's {what} "
                                             f"({method}()), left out as by PEFT's all-linear; {_NOT_DEFAULT}")
        # PEFT's all-linear leaves out every embedding table (GPT-2's wpe, BERT's token types), not only
        # get_input_embeddings(); convolutions stay default targets (a vision model's natural sites)
        for path, mod in model.named_modules():
            if isinstance(mod, _NOT_ALL_LINEAR):
                for name in _module_params(model, mod, aliases):
                    not_default.setdefault(name, f"not a default target: '{path}' is an {type(mod).__name__} of a "
                                                 f"transformers model, left out as by PEFT's all-linear; {_NOT_DEFAULT}")
        not_default.update({k: v for k, v in _routers(model, aliases).items() if k not in not_default})
    refused, names = _parametrized(model, aliases)
    earlier = policy_of(model)  # a folded model keeps the policy of the model it came from
    if isinstance(earlier, TargetPolicy):
        not_default = {**earlier.not_default, **not_default}
        refused, names = {**earlier.refused, **refused}, {**earlier.names, **names}
    return TargetPolicy(not_default=not_default, refused=refused, names=names)


def apply_policy(consumers: Sequence, policy: Optional[TargetPolicy]) -> list:
    """``consumers`` with the policy's facts: refused parameters get their reason, parameters that
    are not default targets lose ``default`` and get ``left_out``."""
    if policy is None or not (policy.refused or policy.not_default):
        return list(consumers)
    out = []
    for c in consumers:
        if c.fqn in policy.refused and c.reason is None:
            why = policy.refused[c.fqn]
            c = replace(c, reason=why, default=False, factorable=False, blocks=(), left_out=why)
        elif c.fqn in policy.not_default and c.default:
            c = replace(c, default=False, left_out=policy.not_default[c.fqn])
        out.append(c)
    return out


def select_targets(consumers: Sequence, targets: Optional[Sequence[str]], exclude: Optional[Sequence[str]],
                   *, policy: Optional[TargetPolicy] = None, root: Optional[nn.Module] = None) -> list:
    """The consumers (:class:`~lora_fx.passes.find_sites.Consumer`) to adapt, in graph order.

    ``targets=None`` takes every default site (a weight of a known weight-consuming op, less what
    the :class:`TargetPolicy` leaves out); otherwise the consumers whose fully qualified parameter
    name matches a pattern (fnmatch), each once.  ``exclude`` patterns are removed afterwards
    (exclude wins).

    Raises:
        TargetError: an empty ``targets``, a pattern matching nothing, or nothing left to adapt
            (the message says which: nothing matched, or ``exclude`` removed every target; and
            lists the candidates).
        UnsupportedSiteError: a pattern names only parameters that cannot be adapted, names one
            exactly, or names a tensor computed by a parametrization (the message gives the reason
            and the fix).
    """
    names = sorted({c.fqn for c in consumers if c.reason is None}) or sorted({c.fqn for c in consumers})
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
            computed = [why for n, why in (policy.names if policy else {}).items() if fnmatch.fnmatchcase(n, pat)]
            if not hit and computed:
                raise UnsupportedSiteError(f"cannot adapt targets pattern {pat!r}: {computed[0]}.")
            if not hit:
                raise _no_match(pat, names, shown, root)
            bad = [c for c in hit if c.reason is not None]
            if bad and (len(bad) == len(hit) or not any(ch in pat for ch in "*?[")):
                if len(bad) == 1:
                    c = bad[0]
                    raise UnsupportedSiteError(
                        f"cannot adapt '{c.fqn}' (used by {c.op}): {c.reason}. Remove it from targets, or "
                        "target a weight matrix instead.")
                raise UnsupportedSiteError(
                    f"targets pattern {pat!r} matches only parameters that cannot be adapted:\n  - "
                    + "\n  - ".join(f"'{c.fqn}' (used by {c.op}): {c.reason}" for c in bad[:8])
                    + "\nRemove the pattern from targets, or target a weight matrix instead.")
            new = [c for c in hit if c.reason is None and id(c) not in seen]  # O(n): no list scans
            seen.update(id(c) for c in new)
            chosen.extend(new)
    matched = len(chosen)
    if exclude is not None:
        for pat in exclude:
            if not any(fnmatch.fnmatchcase(c.fqn, pat) for c in consumers):
                raise TargetError(f"exclude pattern {pat!r} matches no parameter consumed by the model's "
                                  f"forward. Candidates: {shown}")
        chosen = [c for c in chosen if not any(fnmatch.fnmatchcase(c.fqn, p) for p in exclude)]
    if not chosen:
        picked = "the default targets" if targets is None else f"targets={list(targets)}"
        if matched:
            were = sorted({c.fqn for c in consumers if (c.default if targets is None else c.reason is None)
                           and (targets is None or any(fnmatch.fnmatchcase(c.fqn, t) for t in targets))})
            raise TargetError(
                f"no site to adapt: exclude removed every target (exclude={list(exclude or ())} removed all "
                f"{len(were)} parameter(s) {picked} chose: {', '.join(were[:10])}{', ...' if len(were) > 10 else ''}). "
                f"Narrow the exclude patterns, or name what to adapt with targets=[...]. Candidates: {shown}")
        why = sorted({f"{c.fqn}: {c.left_out}" for c in consumers if c.left_out})[:8]
        raise TargetError(
            "no site to adapt: the model has no default target (a weight of linear, conv, conv_transpose, "
            "embedding, matmul or attention ops). Name parameters explicitly with targets=[...]. Candidates: "
            f"{shown}" + ("\nWhy each is left out:\n  - " + "\n  - ".join(why) if why else ""))
    return chosen


def _no_match(pat: str, names: Sequence[str], shown: str, root: Optional[nn.Module]) -> Exception:
    """The error for a targets pattern that matches no consumed parameter: why a parameter of the
    model it names is not a target (1-D, kept Python, read by no adaptable op), or the pattern
    that was probably meant (PEFT's ``target_modules`` name modules: ``"q_proj"``)."""
    params = [(n, p) for n, p in (root.named_parameters(remove_duplicate=False) if root is not None else ())
              if fnmatch.fnmatchcase(n, pat) and not is_adapter_path(n)]
    if params:
        n, p = params[0]
        why = weights.reason(p)
        if why is not None:
            return UnsupportedSiteError(f"cannot adapt '{n}' (targets pattern {pat!r}): {why}. Remove it from targets, "
                                        "or target a weight matrix instead.")
        kept = _kept_by(root, n)
        return TargetError(f"targets pattern {pat!r} names '{n}', which cannot be a target: "
                           + (kept or "no op lora_fx adapts (linear, conv, embedding, matmul, attention) reads it in "
                              "the captured graph (register a rule for the op that reads it: "
                              "lora_fx.register_function_rule)") + f". Candidates: {shown}")
    hint = ""
    for guess in (f"*.{pat}.weight", f"*{pat}*"):
        found = [n for n in names if fnmatch.fnmatchcase(n, guess)]
        if found and guess != pat:
            hint = (f" Patterns match full parameter names (fnmatch), not module names: {guess!r} matches "
                    f"{len(found)} ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}).")
            break
    return TargetError(f"targets pattern {pat!r} matches no parameter consumed by the model's forward.{hint} "
                       f"Candidates: {shown}")


def find_left_out(root: nn.Module, consumers: Sequence, chosen: Sequence, *, targets: Optional[Sequence[str]],
                  exclude: Optional[Sequence[str]], trainable: Sequence[str] = ()) -> tuple[LeftOut, ...]:
    """Every weight-like parameter of ``root`` (floating point, at least 2-D, not an adapter's)
    that ``chosen`` does not adapt, once per parameter object (all its names), with the reason:
    the consumer's ``left_out`` reason, the user's ``targets`` / ``exclude`` / ``trainable``
    (trained in full), or "not used by the forward".  ``LeftOut.by_user`` marks what the user's own
    choices left out."""
    adapted = {(c.gm_path, c.param) for c in chosen}
    trained = set(trainable)
    by_fqn: dict[str, list] = {}
    for c in consumers:
        by_fqn.setdefault(c.fqn, []).append(c)
    groups: dict[int, list[str]] = {}
    tensors: dict[int, object] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        if not is_adapter_path(name):
            groups.setdefault(id(p), []).append(name)
            tensors[id(p)] = p
    out = []
    for key, names in groups.items():
        p = tensors[key]
        if weights.reason(p) is not None:  # 1-D, integer: not weight-like
            continue
        used = [c for n in names for c in by_fqn.get(n, [])]
        if any((c.gm_path, c.param) in adapted for c in used):
            continue
        if trained & set(names):
            reason, by_user = "trained in full (trainable=), no adapter on it", True
        else:
            reason, by_user = _why(names, used, targets, exclude, _kept_by(root, names[0]))
        out.append(LeftOut(param=names[0], aliases=tuple(names), shape=tuple(weights.logical_shape(p)),
                           op="+".join(sorted({c.op for c in used})) or "unused", reason=reason, by_user=by_user))
    return tuple(out)


def _kept_by(root: nn.Module, name: str) -> Optional[str]:
    """Why no graph reads parameter ``name``, when the module holding it kept its own Python (the
    regions front-end: the nearest visited module above it is kept, not a region), else None."""
    path = name.rpartition(".")[0]
    while True:
        try:
            m = root.get_submodule(path)
        except AttributeError:
            return None
        if REGION_ATTR in m.__dict__:
            return None
        kept = m.__dict__.get(KEPT_ATTR)
        if kept is not None:
            return (f"no graph reads it: its module '{path or '<root>'}' ({type(m).__name__}) is kept as its own "
                    f"Python by the regions front-end ({kept}), so it cannot be adapted there "
                    "(frontend='export' with example_inputs captures the whole forward, where torch.export can "
                    "trace it)")
        if not path:
            return None
        path = path.rpartition(".")[0]


def _why(names: Sequence[str], used: Sequence, targets, exclude, kept: Optional[str] = None) -> tuple[str, bool]:
    def named(patterns):
        return next((p for p in patterns or () for n in names if fnmatch.fnmatchcase(n, p)), None)

    if targets is not None and named(targets) is None:
        return f"not named by targets={list(targets)}", True
    hit = named(exclude)
    if hit is not None:
        return f"excluded by exclude pattern {hit!r}", True
    if not used and kept is not None:
        return kept, False
    if not used:
        return "not used by the forward (no op of the captured graph reads it)", False
    cannot = next((c.reason for c in used if c.reason is not None), None)
    if cannot is not None:
        return f"cannot be adapted: {cannot}", False
    return next((c.left_out for c in used if c.left_out), "not a default target"), False


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
