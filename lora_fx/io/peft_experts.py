"""HF PEFT ``target_parameters`` files: per-expert adapters on stacks of expert weights, and
adapters on 2-D parameters of modules PEFT has no layer for (a mixture-of-experts router's
``gate.weight``, which PEFT's ``all-linear`` targets this way).

A 2-D parameter ``W (out, in)`` is the one-expert case: ``lora_A.weight (r, in)`` and
``lora_B.weight (out, r)`` are ours as they are, ``ΔW = s·B@A`` added to the parameter whatever
op reads it.

PEFT (``lora.ParamWrapper``, PEFT ≥ 0.17) adapts a 3-D parameter ``W (E, d1, d2)`` with one
``nn.Linear`` pair for all experts; its layout, mapped exactly to ours (``lora_A (E, r, in)``,
``lora_B (E, out, r)``, ``ΔW[e] = s·B[e]@A[e]`` in the ``(out, in)`` orientation the op consumes,
which for PEFT is ``in = d2, out = d1``, or ``in = d1, out = d2`` for a transposed stack):

==========================  =======================  ==========================================
PEFT tensor                 shape                    ours
==========================  =======================  ==========================================
``<prefix>lora_A.weight``   ``(E·r, in)``            ``A.reshape(E·r, in)`` (expert-major rows)
``<prefix>lora_B.weight``   ``(out, r·E)``           ``B.permute(1, 2, 0).reshape(out, r·E)``
                                                     (column ``k·E + e`` is ``B[e][:, k]``)
==========================  =======================  ==========================================

The file does not name the parameter: PEFT nests one wrapper per targeted parameter of a module,
in the module's registration order, the first innermost, so the ``i``-th of the ``k`` targeted
parameters of module ``m`` has the key prefix ``base_model.model.<m>.`` + ``base_layer.`` × ``(k-1-i)``.
The config lists the parameters in ``target_parameters`` (PEFT matches ``name == t`` or
``name.endswith("." + t)``); ``rank_pattern`` / ``alpha_pattern`` are keyed by parameter name.
PEFT's wrapper refuses LoRA dropout, DoRA and trained biases.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..state import is_adapter_path

__all__ = ["expert_factors", "to_peft", "from_peft", "key_prefixes", "resolve_target_parameters", "ExpertTarget", "plan_experts"]


def expert_factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(A (E, r, in), B (E, out, r), r, lora_alpha)`` of an expert adapter such that PEFT's
    ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) times ``B[e] @ A[e]`` is its update at its mixing
    weight, exactly: zero padding beyond the logical rank (:func:`lora_fx.reserve_rank_`, a
    lower-rank load) is dropped (non-zero padding is kept, ``r`` the capacity and ``lora_alpha``
    rescaled), the mixing weight is folded into ``lora_alpha`` (a negative one into the sign of ``B``)."""
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    rank, alpha, mix = int(adapter.rank), float(adapter.alpha), float(adapter.mix)
    if a.shape[-2] > rank and bool((a[:, rank:] == 0).all()) and bool((b[..., rank:] == 0).all()):
        a, b = a[:, :rank], b[..., :rank]
    if mix < 0:
        b, mix = -b, -mix
    r = int(a.shape[-2])
    if r == rank:
        return a, b, r, alpha * mix
    s = adapter.base_scaling * mix
    return a, b, r, s * (math.sqrt(r) if adapter.use_rslora else r)


def to_peft(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours ``A (E, r, in)``, ``B (E, out, r)`` → PEFT ``lora_A.weight (E·r, in)``, ``lora_B.weight (out, r·E)``."""
    e, r, n_in = lora_A.shape
    return lora_A.reshape(e * r, n_in), lora_B.permute(1, 2, 0).reshape(lora_B.shape[1], r * e)


def from_peft(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT ``lora_A.weight (E·r, in)``, ``lora_B.weight (out, r·E)`` → ours ``A (E, r, in)``, ``B (E, out, r)``."""
    r = lora_a.shape[0] // experts
    return (lora_a.reshape(experts, r, lora_a.shape[-1]),
            lora_b.reshape(lora_b.shape[0], r, experts).permute(2, 0, 1).contiguous())


def key_prefixes(model: nn.Module, params) -> dict[str, str]:
    """``{parameter name: PEFT key prefix}`` for the targeted ``params`` (PEFT's nesting rule)."""
    wanted = set(params)
    out = {}
    for mname, mod in model.named_modules():
        mine = [f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False)
                if (f"{mname}.{p}" if mname else p) in wanted]
        for i, fqn in enumerate(mine):
            out[fqn] = f"base_model.model.{mname + '.' if mname else ''}" + "base_layer." * (len(mine) - 1 - i)
    return out


def resolve_target_parameters(model: nn.Module, targets) -> list[str]:
    """The model's 2-D and 3-D parameters PEFT's ``target_parameters`` names (``name == t`` or
    ``name.endswith("." + t)``), in model order."""
    targets = list(targets or ())
    return [n for n, p in model.named_parameters() if not is_adapter_path(n) and p.dim() in (2, 3)
            and any(n == t or n.endswith("." + t) for t in targets)]


def _pattern(patterns: dict, name: str):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


@dataclass
class ExpertTarget:
    """One parameter a PEFT file adapts: its name, ``(A, B)`` in our layout (``(E, r, in)`` /
    ``(E, out, r)`` for a stack, ``(r, in)`` / ``(out, r)`` for a 2-D parameter), rank and alpha."""

    param: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    alpha: float


def plan_experts(model: nn.Module, config: dict, tensors: dict[str, torch.Tensor]
                 ) -> tuple[list[ExpertTarget], dict[str, torch.Tensor], list[str]]:
    """Take a PEFT file's ``target_parameters`` tensors out of ``tensors``.

    Returns:
        ``(targets, the remaining tensors, problems)``: every missing or mis-shaped tensor is a
        problem (orientation: ``in`` / ``out`` of each stack as lora_fx sites report it when the
        model is adapted, else PEFT's rule ``in = d2, out = d1``, swapped for transposed stacks).
    """
    names = resolve_target_parameters(model, config.get("target_parameters"))
    if not names:
        return [], dict(tensors), ([f"target_parameters {config.get('target_parameters')} name no 2-D or 3-D "
                                    f"parameter of {type(model).__name__}"] if config.get("target_parameters") else [])
    params = dict(model.named_parameters())
    prefixes = key_prefixes(model, names)
    rest, targets, problems = dict(tensors), [], []
    r0, a0 = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    for name in names:
        w = params[name]
        if w.dim() == 2:  # one expert: (out, in) as PEFT's Linear layout
            e, (n_out, n_in) = 1, w.shape
        else:
            e, d1, d2 = w.shape
            transposed = bool(getattr(model.get_submodule(name.rpartition(".")[0]), "is_transposed", False))
            n_in, n_out = (d1, d2) if transposed else (d2, d1)
        ka, kb = prefixes[name] + "lora_A.weight", prefixes[name] + "lora_B.weight"
        if ka not in rest or kb not in rest:
            problems += [f"'{name}': file lacks {k!r}" for k in (ka, kb) if k not in rest]
            continue
        la, lb = rest.pop(ka), rest.pop(kb)
        r = _pattern(config.get("rank_pattern"), name) or r0
        if tuple(la.shape) != (e * r, n_in) or tuple(lb.shape) != (n_out, r * e):
            what = f"{e} experts, weight" if w.dim() == 3 else "weight"
            problems.append(f"'{name}' ({what} {tuple(w.shape)}): file has lora_A {tuple(la.shape)} / "
                            f"lora_B {tuple(lb.shape)}, expected ({e * r}, {n_in}) / ({n_out}, {r * e}) for rank {r}")
            continue
        a, b = (la, lb) if w.dim() == 2 else from_peft(la, lb, e)
        alpha = _pattern(config.get("alpha_pattern"), name)
        targets.append(ExpertTarget(name, a, b, int(r), float(a0 if alpha is None else alpha)))
    return targets, rest, problems
