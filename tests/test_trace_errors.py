"""CASES.md case 9: untraceable models raise a typed TraceError naming the module and the line,
suggesting the escape hatches; the model is unchanged; the escape hatches work."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import lora_fx
from _checks import assert_unchanged, snapshot
from _reference import check_matches_reference, randomize_, reference_call
from _tolerance import assert_close
from lora_fx.errors import LoraFxError, LoraFxWarning, TraceError


class ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(12, 4)
        self.narrow = nn.Linear(6, 4)

    def forward(self, x):
        if x.shape[1] > 8:  # data-dependent branch
            return self.wide(x)
        return self.narrow(x)


class OptionalBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x, temperature=None):
        if temperature is not None and temperature > 1.0:  # branch on an optional argument
            x = x / temperature
        return self.fc(x)


class Outer(nn.Module):
    """Case 9a nested: the culprit is ``layers.1`` inside a ModuleList."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.layers = nn.ModuleList([nn.Linear(12, 12), ShapeBranch()])

    def forward(self, x):
        x = self.inp(x)
        for layer in self.layers:
            x = layer(x)
        return x


class Nested(nn.Module):
    """Case 9b nested in a plain submodule (not a block)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 6))
        self.dec = OptionalBranch()

    def forward(self, x, temperature=None):
        return self.dec(self.enc(x), temperature)


def _line_of(cls, text):
    src, start = inspect.getsourcelines(cls.forward)
    return start + next(i for i, line in enumerate(src) if text in line)


def _check_message(msg, module_name, cls, text):
    assert f"'{module_name}'" in msg and cls.__name__ in msg
    assert f"{__file__}:{_line_of(cls, text)}" in msg, msg
    assert text in msg
    assert "concrete_args" in msg and "leaf_modules" in msg and "export" in msg


@pytest.mark.parametrize("make, name, cls, text", [
    (ShapeBranch, "<root>", ShapeBranch, "if x.shape[1] > 8"),
    (Outer, "layers.1", ShapeBranch, "if x.shape[1] > 8"),
    (OptionalBranch, "<root>", OptionalBranch, "temperature > 1.0"),
    (Nested, "dec", OptionalBranch, "temperature > 1.0"),
])
def test_trace_error_names_module_and_line(make, name, cls, text):
    """CASES.md 9: shape branch and optional-argument branch, at the root and nested."""
    torch.manual_seed(0)
    model = make()
    snap = snapshot(model)
    with pytest.raises(TraceError) as ei:
        lora_fx.transform(model, rank=2, frontend="fx")  # "auto" keeps the failing module as Python
    err = ei.value
    assert isinstance(err, LoraFxError) and isinstance(err, RuntimeError)
    assert err.__cause__ is not None  # the original fx error is chained
    _check_message(str(err), name, cls, text)
    assert_unchanged(model, snap)
    assert not any(isinstance(m, lora_fx.LoraAdapter) for m in model.modules())


def test_escape_hatch_concrete_args():
    """CASES.md 9: the suggested concrete_args works."""
    torch.manual_seed(0)
    model = OptionalBranch()
    x = torch.randn(2, 6)
    for t in (None, 2.0):
        gm = randomize_(lora_fx.transform(model, rank=2, concrete_args={"temperature": t}))
        assert_close(gm(x, temperature=t), reference_call(model, gm, (x,), {"temperature": t}))
        assert_close(gm(x, t), reference_call(model, gm, (x, t)))
    # a value other than the one traced for fails loudly
    gm = lora_fx.transform(model, rank=2, concrete_args={"temperature": None})
    with pytest.raises(AssertionError, match="temperature"):
        gm(x, temperature=3.0)


def test_escape_hatch_leaf_modules():
    """CASES.md 9: the suggested leaf_modules works."""
    torch.manual_seed(0)
    model = Outer()
    x = torch.randn(2, 6)
    gm = lora_fx.transform(model, rank=2, leaf_modules=["layers.1"])
    assert {s.param for s in lora_fx.sites(gm)} == {"inp.weight", "layers.0.weight"}
    gm = lora_fx.transform(model, rank=2, leaf_modules=["layers.1"], targets=["inp.weight", "layers.1.wide.weight"])
    assert [s.lowering for s in lora_fx.sites(gm)] == ["factored", "merge"]
    randomize_(gm)
    check_matches_reference(model, gm, (x,))


def test_root_optional_argument_traced_as_tensor_warns():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, mask=None):
            y = self.fc(x)
            return y * mask if mask is not None else y

    with pytest.warns(LoraFxWarning, match="concrete_args"):
        lora_fx.transform(M(), rank=2, frontend="fx")
    gm = lora_fx.transform(M(), rank=2, frontend="fx", concrete_args={"mask": None})
    assert gm(torch.randn(2, 3)).shape == (2, 3)


@pytest.mark.parametrize("name", ["meta", "graph", "code"])
@pytest.mark.parametrize("nested", [False, True])
def test_submodules_named_like_graph_module_attributes_are_a_clear_error(name, nested):
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            setattr(self, name, nn.Linear(4, 4))

        def forward(self, x):
            return getattr(self, name)(x)

    model = nn.Sequential(Inner(), nn.Linear(4, 2)) if nested else Inner()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lora_fx.TraceError, match="Rename the attribute") as err:
        lora_fx.transform(model, rank=2)
    assert name in str(err.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
