"""Writes to module state during capture, on both front-ends.

A forward that writes buffers or tensor attributes in place (a step counter, an EMA, ``copy_``,
``+=``, slice assignment) is captured as graph ops on the adapted copy's own state: over several
calls, in train and eval mode, the adapted model's outputs and buffers equal those of the model
with the adapted weights (``W + s·ΔW``) run side by side.  Capture itself (the export front-end's
check run included) leaves every buffer as it was.  An assignment whose previous value the forward
reads (``self.count = self.count + 1``) is refused where the front-end would drop it, with a
``TraceError`` naming the attribute and the module; an assignment of a value computed anew in every
call only warns.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lora_fx
from _reference import randomize_, reference_model
from _tolerance import assert_close


class Steps(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("steps", torch.zeros(()))

    def forward(self, x):
        self.steps.add_(1)
        return self.lin(x) * (1 + 0.1 * self.steps)


class EMA(nn.Module):
    def __init__(self, m=0.9):
        super().__init__()
        self.m = m
        self.lin = nn.Linear(4, 3)
        self.register_buffer("avg", torch.zeros(4))

    def forward(self, x):
        self.avg.mul_(self.m).add_(x.detach().mean(0), alpha=1 - self.m)
        return self.lin(x - self.avg)


class CopyLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("last", torch.zeros(3))

    def forward(self, x):
        y = self.lin(x) + self.last
        self.last.copy_(y.detach().mean(0))
        return y


class Accumulate(nn.Module):
    """``+=`` on a buffer and on a plain tensor attribute, and a slice assignment."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("total", torch.zeros(3))
        self.seen = torch.zeros(())
        self.register_buffer("first", torch.zeros(2))

    def forward(self, x):
        y = self.lin(x)
        self.total += y.detach().sum(0)
        self.seen += 1
        self.first[0] = 7.0
        return y + 0.01 * self.total / self.seen + self.first[0]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return torch.tanh(self.lin(x)) + 0.01 * self.calls


class Blocks(nn.Module):
    """Blocks of one ``nn.ModuleList``: one traced graph reused, each block counting its own calls."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


MODELS = {"steps": Steps, "ema": EMA, "copy": CopyLast, "accumulate": Accumulate, "blocks": Blocks}


def _state(m: nn.Module) -> dict:
    out = {k: v.detach().clone() for k, v in m.named_buffers() if ".lora." not in f".{k}"}
    for path, mod in m.named_modules():
        for k, v in vars(mod).items():
            if isinstance(v, torch.Tensor):
                out[f"{path}.{k}" if path else k] = v.detach().clone()
    return out


@pytest.mark.parametrize("frontend", ["fx", "export", "regions"])
@pytest.mark.parametrize("name", list(MODELS))
def test_in_place_writes_track_the_model(name, frontend):
    torch.manual_seed(0)
    model = MODELS[name]()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 4, generator=g) for _ in range(6)]
    before = _state(model)
    inputs = {} if frontend == "regions" else {"example_inputs": (xs[0],)}  # regions: the model keeps its class
    gm = lora_fx.transform(model, rank=2, frontend=frontend, **inputs)
    assert lora_fx.state.frontend_of(gm) == frontend
    assert _state(model).keys() == before.keys() and all(torch.equal(_state(model)[k], v) for k, v in before.items())
    got = _state(gm)
    for k, v in before.items():  # the capture (and its checks) wrote nothing
        assert torch.equal(got[k], v), k
    randomize_(gm, seed=2)
    ref = reference_model(model, gm)  # the model with W + s·ΔW, run side by side
    for i, x in enumerate(xs):
        mode = i < 3  # train, then eval
        gm.train(mode)
        ref.train(mode)
        with torch.no_grad():
            assert_close(gm(x), ref(x))
        mine, theirs = _state(gm), _state(ref)
        for k, v in theirs.items():
            assert_close(mine[k], v, dtype=torch.float32)
    assert all(torch.equal(_state(model)[k], v) for k, v in before.items())  # the user's model untouched


class Reassign(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("count", torch.zeros(()))

    def forward(self, x):
        self.count = self.count + 1
        return self.lin(x) * self.count


class ReassignPlain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.state = torch.zeros(3)

    def forward(self, x):
        y = self.lin(x) + self.state
        self.state = self.state + y.detach().mean(0)
        return y


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n = self.n + 1
        return self.lin(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(Inner())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inner(x))


X = torch.randn(3, 4)


@pytest.mark.parametrize("model, frontend, names", [
    (Reassign, "fx", ("'count'", "module '<root>'", "Reassign")),
    (ReassignPlain, "fx", ("'state'", "attribute", "ReassignPlain")),
    (ReassignPlain, "export", ("'state'", "attribute", "register_buffer")),
    (Outer, "fx", ("'inner.0.n'", "module 'inner.0'", "Inner")),
])
def test_assignments_that_would_be_dropped_are_refused(model, frontend, names):
    with pytest.raises(lora_fx.TraceError) as ei:
        lora_fx.transform(model(), rank=2, frontend=frontend, example_inputs=(X,))
    for needle in names + ("in place" if frontend == "fx" else "buffer",):
        assert needle in str(ei.value), str(ei.value)


def test_regions_keep_a_module_that_assigns_state_as_its_own_python():
    """The regions front-end keeps the assigning module's Python (the reason names the attribute)
    and captures its children: the assignment runs as in the model, call after call."""
    torch.manual_seed(0)
    model = Reassign()
    gm = lora_fx.transform(model, rank=2, frontend="regions")
    kept = {r["module"]: r["captured"] for r in lora_fx.summary(gm, show=False).captured}
    assert kept[""].startswith("kept") and "'count'" in kept[""] and kept["lin"] == "fx"
    randomize_(gm, seed=2)
    ref = reference_model(model, gm)
    for _ in range(3):
        with torch.no_grad():
            assert_close(gm(X), ref(X))
    assert float(gm.count) == float(ref.count) == 3.0 and float(model.count) == 0.0


def test_buffer_assignment_falls_back_to_export_and_tracks():
    """``frontend="auto"`` with example inputs: torch.fx refuses the assignment, torch.export keeps it."""
    torch.manual_seed(0)
    model = Reassign()
    gm = lora_fx.transform(model, rank=2, example_inputs=(X,))
    assert gm.meta["lora_fx_frontend"] == "export"
    ref = copy.deepcopy(model)
    for _ in range(3):
        with torch.no_grad():
            assert_close(gm(X), ref(X))
    assert float(gm.count) == float(ref.count) == 3.0


class WriteOnly(nn.Module):
    """Assigns an attribute it never reads: outputs stay exact, the assignment is not kept (warned)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        y = self.lin(x)
        self.last = y.detach()
        return y


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_assignment_of_a_value_computed_anew_warns(frontend):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = lora_fx.transform(WriteOnly(), rank=2, frontend=frontend, example_inputs=(X,))
    msgs = [str(w.message) for w in caught if issubclass(w.category, lora_fx.LoraFxWarning)]
    assert any("'last'" in m and "not keep" in m for m in msgs), msgs
    assert gm(X).shape == (3, 3)
