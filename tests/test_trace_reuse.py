"""transform() traces a block once and copies its graph to blocks built the same way, and compiles
every GraphModule once: the copies must behave exactly like separate traces."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import fx, nn

import lora_fx
from lora_fx.graph_module import LoraGraphModule, deferred_recompile, value_key
from lora_fx.passes import trace as trace_pass

from _tolerance import assert_close, assert_not_close


class Block(nn.Module):
    def __init__(self, d, act="relu", scale=1.0):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.act = act
        self.scale = scale

    def forward(self, x):
        h = self.fc(self.norm(x))
        h = torch.relu(h) if self.act == "relu" else torch.tanh(h)
        return x + h * self.scale


class Net(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def traces(monkeypatch):
    """Roots LoraTracer.trace ran on, by type name."""
    seen = []
    orig = trace_pass.LoraTracer.trace

    def counting(self, root, concrete_args=None):
        seen.append(type(root).__name__)
        return orig(self, root, concrete_args)

    monkeypatch.setattr(trace_pass.LoraTracer, "trace", counting)
    return seen


def _randomize(gm):
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if n.endswith("lora_B"):
                p.normal_()


def _check(model, gm):
    assert_close(gm(X), model(X), ulps=4)  # B = 0: the original function, to a few roundings


def test_identical_blocks_trace_once_and_keep_their_own_weights(traces):
    model = Net([Block(4) for _ in range(4)])
    gm = lora_fx.transform(model, rank=2, targets=["blocks.*.fc.weight"])
    assert traces.count("Block") == 1
    graphs = [gm.blocks[i].graph for i in range(4)]
    assert len({id(g) for g in graphs}) == 4
    for i in range(4):  # each block reads its own (copied) weights
        assert torch.equal(gm.blocks[i].fc.weight, model.blocks[i].fc.weight)
        assert gm.blocks[i].fc.weight is not gm.blocks[0].fc.weight or i == 0
    _check(model, gm)
    _randomize(gm)
    folded = lora_fx.fold(gm)
    assert_close(folded(X), gm(X))
    before = [gm.blocks[i](X) for i in range(4)]
    with torch.no_grad():  # a change to one block's weight shows in that block only
        gm.blocks[2].fc.weight.add_(torch.randn(4, 4))
    after = [gm.blocks[i](X) for i in range(4)]
    assert [torch.equal(b, a) for b, a in zip(before, after)] == [True, True, False, True]


@pytest.mark.parametrize("variant", [dict(act="tanh"), dict(scale=0.5), dict(scale=-0.0)])
def test_blocks_that_differ_are_traced_separately(traces, variant):
    model = Net([Block(4), Block(4, **variant), Block(4)])
    gm = lora_fx.transform(model, rank=2, targets=["blocks.*.fc.weight"])
    assert traces.count("Block") == 2
    _check(model, gm)


def test_shared_graph_copies_are_independent():
    model = Net([Block(4) for _ in range(3)])
    gm = lora_fx.transform(model, rank=2, targets=["blocks.1.fc.weight"])  # rewrites block 1 only
    assert "lora" in gm.blocks[1].code and "lora" not in gm.blocks[0].code and "lora" not in gm.blocks[2].code
    assert gm.blocks[0].code == gm.blocks[2].code
    _randomize(gm)
    assert_not_close(gm(X), model(X))


def test_forward_hooks_inside_a_block_prevent_reuse(traces):
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    class HBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()

        def forward(self, x):
            return x + self.inner(x)

    model = Net([HBlock() for _ in range(3)])
    model.blocks[1].inner.register_forward_hook(lambda m, i, o: o * 3)  # runs (and is inlined) while tracing
    gm = lora_fx.transform(model, rank=2, targets=["blocks.*.inner.fc.weight"])
    assert traces.count("HBlock") == 2  # blocks 0 and 2 share a trace; the hooked block 1 has its own
    _check(model, gm)
    for i in range(3):
        assert_close(gm.blocks[i](X), model.blocks[i](X), ulps=4)


def test_tensor_attribute_or_mutating_forward_prevents_reuse(traces):
    class TBlock(Block):
        def __init__(self, d, k):
            super().__init__(d)
            self.k = torch.tensor(float(k))  # plain tensor attribute: its value may steer the trace

        def forward(self, x):
            return super().forward(x) * self.k

    class MBlock(Block):
        def forward(self, x):
            self.fc.calls = getattr(self.fc, "calls", 0) + 1  # changes the module while tracing
            return super().forward(x)

    model = Net([TBlock(4, k) for k in (1, 2, 3)])
    _check(model, lora_fx.transform(model, rank=2, targets=["blocks.*.fc.weight"]))
    assert traces.count("TBlock") == 3
    model = Net([MBlock(4) for _ in range(3)])
    _check(model, lora_fx.transform(model, rank=2, targets=["blocks.*.fc.weight"]))
    assert traces.count("MBlock") == 3


def test_every_graph_module_is_compiled_once(monkeypatch):
    calls = []
    orig = fx.GraphModule.recompile

    def counting(self):
        calls.append(id(self))
        return orig(self)

    monkeypatch.setattr(fx.GraphModule, "recompile", counting)
    model = Net([Block(4) for _ in range(5)])
    gm = lora_fx.transform(model, rank=2, targets=["blocks.*.fc.weight", "head.weight"])
    gms = [m for m in gm.modules() if isinstance(m, fx.GraphModule)]
    assert sorted(calls) == sorted(id(m) for m in gms)
    for m in gms:
        assert not m._lora_fx_stale() and "def forward" in m.code
    _check(model, gm)
    again = pickle.loads(pickle.dumps(gm))
    assert torch.equal(again(X), gm(X))


def test_deferred_recompile_compiles_on_use():
    model = Net([Block(4) for _ in range(2)])
    gm = lora_fx.transform(model, rank=2)
    with deferred_recompile():
        gm.blocks[0].recompile()
        assert gm.blocks[0]._lora_fx_stale()
        assert torch.equal(gm(X), model(X))  # compiles on call
        assert not gm.blocks[0]._lora_fx_stale()
        gm.blocks[1].recompile()
        assert "def forward" in gm.blocks[1].code  # compiles on .code
        gm.blocks[0].recompile()
    assert not gm.blocks[0]._lora_fx_stale() and isinstance(gm.blocks[0], LoraGraphModule)


def test_value_key():
    assert value_key(0.0) != value_key(-0.0)
    assert value_key(1) != value_key(True) and value_key(1) != value_key(1.0)
    assert value_key((1, [2, {"a": None}])) == value_key((1, [2, {"a": None}]))
    assert value_key((1, 2)) != value_key([1, 2])
    obj = object()
    assert value_key(obj) == value_key(obj) and value_key(obj) != value_key(object())
    with pytest.raises(Exception):
        value_key([torch.zeros(2)])


def test_constant_arguments_are_part_of_the_key(traces):
    class SBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale=1.0):
            h = self.fc(x)
            if scale != 1.0:
                h = h * scale
            return x + h

    class SNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(SBlock() for _ in range(4))

        def forward(self, x):
            x = self.blocks[0](x)
            x = self.blocks[1](x, scale=-0.0)
            x = self.blocks[2](x, scale=0.0)
            return self.blocks[3](x)

    model = SNet()
    gm = lora_fx.transform(model, rank=2, targets=["blocks.*.fc.weight"])
    assert traces.count("SBlock") == 3  # 1.0 (blocks 0 and 3), -0.0 and 0.0
    assert "-0.0" in gm.blocks[1].code and "-0.0" not in gm.blocks[2].code
    _check(model, gm)
