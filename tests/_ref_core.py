"""Independent references for the core tests: the adapted model must compute exactly what
``torch.func.functional_call(model, {param: W + s·(B@A).reshape(W.shape)})`` computes.

The reference is built here from the factors that ``lora_fx.sites`` reports (CASES.md case 10),
never from lora_fx's own merge/fold code.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

import lora_fx
from lora_fx import ops

from _tolerance import assert_close, close_tol

__all__ = ["randomize_", "reference_overrides", "reference_call", "check_matches_reference",
           "lora_node_counts", "snapshot", "assert_unchanged", "tol"]

DELTA = {ops.merge: "merge", ops.linear_delta: "linear_delta", ops.matmul_delta: "matmul_delta",
         ops.embedding_delta: "embedding_delta", ops.conv_delta: "conv_delta", ops.module_call: "module_call"}


def tol(dtype: torch.dtype, expected: torch.Tensor | None = None) -> dict:
    """``assert_close`` tolerances for a computation in ``dtype`` compared with ``expected``: from the
    dtype's epsilon and ``expected``'s magnitude (:func:`_tolerance.close_tol`)."""
    return close_tol(torch.ones((), dtype=dtype) if expected is None else expected, dtype)


def randomize_(gm: nn.Module, seed: int = 1, scale: float = 0.5) -> nn.Module:
    """Non-zero random ``lora_A`` and ``lora_B`` on every site (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            for p in (s.lora_A, s.lora_B):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return gm


def reference_overrides(model: nn.Module, gm: nn.Module) -> dict[str, torch.Tensor]:
    """``{name: W + s·(B@A).reshape(W.shape)}`` for every targeted alias, computed from the factors
    in float32 and rounded once to ``W``'s dtype; differentiable in ``lora_A`` / ``lora_B``."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for s in lora_fx.sites(gm):
        w = params[s.param]
        s_val = s.alpha / s.rank  # independent of the adapter's buffer
        assert abs(s.scaling - s_val) < 1e-12
        delta = s_val * (s.lora_B.float() @ s.lora_A.float()).reshape(w.shape)
        merged = (w.detach().float() + delta).to(w.dtype)
        for name in s.aliases:
            out[name] = merged
    return out


def reference_call(model: nn.Module, gm: nn.Module, args, kwargs=None):
    return torch.func.functional_call(model, reference_overrides(model, gm), tuple(args), kwargs or {},
                                      tie_weights=False, strict=False)


def _leaves(gm, xs):
    sites = lora_fx.sites(gm)
    return [p for s in sites for p in (s.lora_A, s.lora_B)] + [x for x in xs if x.requires_grad]


def check_matches_reference(model: nn.Module, gm: nn.Module, inputs, *, dtype=torch.float32,
                            grad_input: bool = True, seed: int = 7) -> torch.Tensor:
    """Outputs and gradients of every ``lora_A``, ``lora_B`` and the floating inputs of ``gm`` equal
    those of the functional reference.  Returns ``gm``'s output."""

    def prep():
        return [x.detach().clone().requires_grad_(grad_input and x.is_floating_point()) for x in inputs]

    xg, xr = prep(), prep()
    out = gm(*xg)
    ref = reference_call(model, gm, xr)
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    assert_close(out, ref, dtype=dtype)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    lg, lr = _leaves(gm, xg), _leaves(gm, xr)
    g1 = torch.autograd.grad(out, lg, gy, allow_unused=True)
    g2 = torch.autograd.grad(ref, lr, gy, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, dtype=dtype)
    return out


def lora_node_counts(gm: nn.Module) -> Counter:
    """Counts of lora_fx op nodes over every GraphModule of ``gm`` (``"merge"``, ``"linear_delta"``, ...)."""
    c = Counter()
    for m in gm.modules():
        if isinstance(m, torch.fx.GraphModule):
            for n in m.graph.nodes:
                if n.op == "call_function" and n.target in DELTA:
                    c[DELTA[n.target]] += 1
    return c


def snapshot(model: nn.Module) -> dict:
    """Everything transform must leave alone: values, requires_grad, submodules, state-dict keys."""
    return {
        "sd": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "rg": {k: p.requires_grad for k, p in model.named_parameters(remove_duplicate=False)},
        "mods": [(n, type(m), id(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "ids": {k: id(p) for k, p in model.named_parameters(remove_duplicate=False)},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert list(now["sd"]) == list(snap["sd"])
    for k, v in snap["sd"].items():
        assert torch.equal(now["sd"][k], v), k
    assert now["rg"] == snap["rg"]
    assert now["mods"] == snap["mods"]
    assert now["ids"] == snap["ids"]
    assert now["training"] == snap["training"]
