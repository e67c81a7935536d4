"""Property test: nothing is left out silently.

Random module trees (nested containers, ``nn.ModuleList`` blocks, custom parents) whose leaves are
drawn from weights that the default targets adapt and weights they must report:

* adapted: ``nn.Linear``, ``nn.Conv1d``, ``F.linear`` on an own parameter, a module reading
  ``self.weight.dtype`` / ``.device`` in forward (Gemma-style);
* reported with a reason: parametrized weights (``weight_norm``, a custom parametrization), an unused
  parameter, a weight consumed only by an op the op table does not know (``W.exp()``);
* neither (not weight-like parameters, or not parameters): 1-D gains, integer tables, a 2-D buffer
  used like a weight.

For every tree: every floating-point parameter with at least 2 dimensions is either adapted (named
by a site) or reported by ``lora_fx.left_out`` with a reason, never both; nothing else is reported;
the transform's one warning lists exactly the reported weights; ``summary`` prints each; and at
``B = 0`` the adapted model computes the model's output.  The default profile runs a quarter of the
suite's example count (fast); ``--hypothesis-profile=thorough`` scales it up.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

import lora_fx
from _tolerance import assert_close

D = 4  # every leaf maps (B, T, D) -> (B, T, D)


class Soft(nn.Module):
    def forward(self, w):
        return w * 0.5 + 0.1 * torch.tanh(w)


class FLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D)

    def forward(self, h):
        return F.linear(h, self.weight)


class ReadsDtype(nn.Module):
    """Reads the weight's dtype and device (a Gemma-style scaled layer)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D)
        self.register_buffer("scale", torch.tensor(1.5), persistent=False)

    def forward(self, h):
        return F.linear(h, self.weight) * self.scale.to(device=self.weight.device, dtype=self.weight.dtype)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(D, D, 3, padding=1)

    def forward(self, h):
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


class Unsupported(nn.Module):
    """Its weight only reaches ``exp``, an op without a rule."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(D, D) / D)

    def forward(self, h):
        return h @ self.table.exp()


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.spare = nn.Parameter(torch.randn(D, D))
        self.fc = nn.Linear(D, D)

    def forward(self, h):
        return self.fc(h)


class NotWeights(nn.Module):
    """Parameters and buffers that are not weight-like parameters."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(D))
        self.codes = nn.Parameter(torch.arange(D * D).reshape(D, D), requires_grad=False)
        self.register_buffer("proj", torch.randn(D, D) / D)

    def forward(self, h):
        return (h @ self.proj) * self.gain + self.codes.float().mean() * 0


def _parametrized(kind: str) -> nn.Module:
    lin = nn.Linear(D, D)
    if kind == "weight_norm":
        return parametrizations.weight_norm(lin)
    parametrize.register_parametrization(lin, "weight", Soft())
    return lin


LEAVES = {
    "linear": lambda: nn.Linear(D, D),
    "flinear": FLinear,
    "reads_dtype": ReadsDtype,
    "conv": Conv,
    "weight_norm": lambda: _parametrized("weight_norm"),
    "parametrized": lambda: _parametrized("custom"),
    "unsupported": Unsupported,
    "unused": Unused,
    "not_weights": NotWeights,
}


class Chain(nn.Module):
    """A custom parent: children applied in order with a residual tanh."""

    def __init__(self, children):
        super().__init__()
        for i, c in enumerate(children):
            self.add_module(f"c{i}", c)
        self.n = len(children)

    def forward(self, h):
        for i in range(self.n):
            h = h + torch.tanh(getattr(self, f"c{i}")(h))
        return h


class Stack(nn.Module):
    """Children in an ``nn.ModuleList``: each its own traced block."""

    def __init__(self, children):
        super().__init__()
        self.layers = nn.ModuleList(children)

    def forward(self, h):
        for layer in self.layers:
            h = layer(h)
        return h


@st.composite
def trees(draw, depth=0):
    if depth >= 2 or draw(st.integers(0, 2)) == 0:
        return ("leaf", draw(st.sampled_from(sorted(LEAVES))))
    kind = draw(st.sampled_from(["sequential", "chain", "stack"]))
    return (kind, draw(st.lists(trees(depth + 1), min_size=1, max_size=3)))


def build(tree) -> nn.Module:
    kind, payload = tree
    if kind == "leaf":
        return LEAVES[payload]()
    children = [build(t) for t in payload]
    if kind == "sequential":
        return nn.Sequential(*children)
    return {"chain": Chain, "stack": Stack}[kind](children)


def _weight_like(model: nn.Module) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.ndim >= 2 and p.is_floating_point():
            out.setdefault(id(p), []).append(name)
    return out


@settings(max_examples=max(25, settings().max_examples // 4))
@given(tree=trees(), frontend=st.sampled_from(["fx"] * 7 + ["regions"] * 2 + ["export"]), seed=st.integers(0, 2 ** 16))
def test_every_weight_is_adapted_or_reported(tree, frontend, seed):
    torch.manual_seed(seed)
    model = Chain([build(tree), nn.Linear(D, D)])  # at least one default target
    x = torch.randn(2, 3, D)
    inputs = {} if frontend == "regions" else {"example_inputs": (x,)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = lora_fx.transform(model, rank=2, frontend=frontend, **inputs)
    adapted = {a for s in lora_fx.sites(gm) for a in s.aliases}
    reported = {e.param: e for e in lora_fx.left_out(gm)}
    reported_names = {a for e in reported.values() for a in e.aliases}
    for names in _weight_like(model).values():
        hit, told = set(names) & adapted, set(names) & reported_names
        assert bool(hit) != bool(told), (names, hit, told)  # one or the other, never both
    assert reported_names <= {n for names in _weight_like(model).values() for n in names}
    for e in reported.values():
        assert e.reason and not e.by_user
        leaf = e.param.rsplit(".", 1)[-1]
        if ".parametrizations." in e.param:
            assert "parametrization" in e.reason
        elif leaf == "spare":
            assert "not used" in e.reason or "no graph reads it" in e.reason
        elif leaf == "table":
            assert "exp" in e.reason and "target it by name" in e.reason
    messages = [str(w.message) for w in caught if issubclass(w.category, lora_fx.LoraFxWarning)
                and "leaves out" in str(w.message)]
    assert len(messages) == (1 if reported else 0)
    if reported:
        assert all(name in messages[0] for name in reported)
        text = str(lora_fx.summary(gm, show=False))
        assert all(name in text for name in reported)
    gm.eval(), model.eval()
    with torch.no_grad():
        assert_close(gm(x), model(x), ulps=8)
