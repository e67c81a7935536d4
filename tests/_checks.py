"""Structural checks shared by the suite: the user's model left untouched (a snapshot of everything
a call could change) and counts of the lora_fx op nodes in an adapted model's graphs."""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from lora_fx import ops

__all__ = ["snapshot", "assert_unchanged", "lora_node_counts", "graph_modules"]

_NAMES = {ops.merge: "merge", ops.linear_delta: "linear_delta", ops.matmul_delta: "matmul_delta",
          ops.embedding_delta: "embedding_delta", ops.conv_delta: "conv_delta", ops.module_call: "module_call"}


def snapshot(model: nn.Module) -> dict:
    """Values (parameters and buffers), ``requires_grad`` flags, parameter objects, submodules (name,
    type, identity, attribute names), train/eval flags and the parameter count."""
    return {
        "sd": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "rg": {k: p.requires_grad for k, p in model.named_parameters(remove_duplicate=False)},
        "ids": {k: id(p) for k, p in model.named_parameters(remove_duplicate=False)},
        "mods": [(n, type(m), id(m), sorted(m.__dict__)) for n, m in model.named_modules(remove_duplicate=False)],
        "training": [m.training for m in model.modules()],
        "n_params": sum(p.numel() for p in model.parameters()),
    }


def assert_unchanged(model: nn.Module, snap: dict, x=None, y=None) -> None:
    """``model`` is as :func:`snapshot` saw it; with ``x``: ``model(x)`` is still ``y`` bit for bit."""
    now = snapshot(model)
    assert list(now["sd"]) == list(snap["sd"])
    for k, v in snap["sd"].items():
        assert torch.equal(now["sd"][k], v), k
    for key in ("rg", "ids", "mods", "training", "n_params"):
        assert now[key] == snap[key], key
    if x is not None:
        with torch.no_grad():
            assert torch.equal(model(x), y)


def graph_modules(gm: nn.Module) -> list[torch.fx.GraphModule]:
    return [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]


def lora_node_counts(gm: nn.Module) -> Counter:
    """Counts of lora_fx op nodes over every GraphModule of ``gm`` (``"merge"``, ``"linear_delta"``, ...)."""
    c = Counter()
    for m in graph_modules(gm):
        for n in m.graph.nodes:
            if n.op == "call_function" and n.target in _NAMES:
                c[_NAMES[n.target]] += 1
    return c
