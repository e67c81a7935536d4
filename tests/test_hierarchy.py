"""The result keeps the module hierarchy users hook into: children of an nn.ModuleList (and
``blocks=`` modules) are their own GraphModules that the parent *calls*."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import lora_fx
from _reference import check_matches_reference, randomize_, reference_call
from _tolerance import assert_close


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x, mask=None, scale: float = 1.0):
        h = self.fc2(torch.relu(self.fc1(x)))
        if mask is not None:
            h = h.masked_fill(mask, 0.0)
        if scale != 1.0:
            h = h * scale
        return x + h


class Encoder(nn.Module):
    def __init__(self, d=6):
        super().__init__()
        self.inp = nn.Linear(3, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.Tanh())
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        x = self.inp(x)
        x = self.layers[0](x)                     # default mask=None, scale=1.0
        x = self.layers[1](x, mask=None)          # keyword constant
        x = self.layers[2](x, None, 0.5)          # positional constants
        return self.out(self.mlp(x))


def _enc():
    torch.manual_seed(0)
    return Encoder()


X = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(1))


def test_module_list_children_stay_called_graph_modules():
    model = _enc()
    gm = lora_fx.transform(model, rank=2)
    assert isinstance(gm.layers, nn.ModuleList) and len(gm.layers) == 3
    for blk in gm.layers:
        assert isinstance(blk, fx.GraphModule)
        blk.graph.lint()
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls.count("layers.0") == calls.count("layers.1") == calls.count("layers.2") == 1
    # the block's sites live in the block's own graph
    assert not any(n.op == "call_module" and n.target.startswith("layers.0.") for n in gm.graph.nodes)
    assert {s.param for s in lora_fx.sites(gm)} >= {"layers.1.fc1.weight", "layers.2.fc2.weight"}
    assert "layers.0.fc1.lora.default.weight.lora_A" in gm.state_dict()
    # B = 0 exact, then the functional reference
    assert torch.equal(gm(X), model(X))
    randomize_(gm)
    check_matches_reference(model, gm, (X,))


@pytest.mark.parametrize("lowering", ["auto", "merge"])
def test_forward_hooks_see_the_adapted_output(lowering):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    model.register_forward_hook(lambda m, i, o: o + 1)
    gm = lora_fx.transform(model, rank=2, lowering=lowering)
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    randomize_(gm)
    assert_close(gm(x), reference_call(model, gm, (x,)))


def test_block_hooks_fire():
    """A forward hook on a block (what FSDP2 / checkpointing rely on) fires on the adapted model."""
    gm = lora_fx.transform(_enc(), rank=2)
    seen = []
    for i, blk in enumerate(gm.layers):
        blk.register_forward_pre_hook(lambda m, a, i=i: seen.append(i))
    gm(X)
    assert seen == [0, 1, 2]


def test_blocks_pattern_makes_extra_called_submodules():
    model = _enc()
    gm = lora_fx.transform(model, rank=2, blocks=["mlp"])
    assert isinstance(gm.mlp, fx.GraphModule)
    assert any(n.op == "call_module" and n.target == "mlp" for n in gm.graph.nodes)
    assert "mlp.0.weight" in {s.param for s in lora_fx.sites(gm)}
    randomize_(gm)
    check_matches_reference(model, gm, (X,))


def test_block_called_with_constant_arguments_keeps_keyword_calls():
    """Inferred constant arguments (``mask=None``) keep their names, so calls by keyword work,
    and a different value at run time fails loudly instead of being ignored."""
    gm = lora_fx.transform(_enc(), rank=2)
    blk = gm.layers[1]
    x = torch.randn(2, 6)
    assert torch.equal(blk(x, mask=None), blk(x))
    with pytest.raises(AssertionError, match="mask"):
        blk(x, mask=torch.zeros(2, 6, dtype=torch.bool))


def test_block_called_with_tensor_mask():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Block(4) for _ in range(2))

        def forward(self, x, mask):
            for layer in self.layers:
                x = layer(x, mask=mask)
            return x

    model = Net()
    x, mask = torch.randn(3, 4), torch.rand(3, 4) > 0.5
    gm = lora_fx.transform(model, rank=2)
    assert torch.equal(gm(x, mask), model(x, mask))
    randomize_(gm)
    check_matches_reference(model, gm, (x, mask))


def test_nested_module_lists_and_shared_block():
    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block(4) for _ in range(2))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList(Stage() for _ in range(2))

        def forward(self, x):
            for s in self.stages:
                x = s(x)
            return x

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 4)
    gm = lora_fx.transform(model, rank=2)
    assert isinstance(gm.stages[1], fx.GraphModule) and isinstance(gm.stages[1].blocks, nn.ModuleList)
    assert isinstance(gm.stages[1].blocks[0], fx.GraphModule)
    assert len(lora_fx.sites(gm)) == 8
    randomize_(gm)
    check_matches_reference(model, gm, (x,))


def test_leaf_modules_keep_a_module_opaque():
    model = _enc()
    gm = lora_fx.transform(model, rank=2, leaf_modules=["mlp"])
    assert any(n.op == "call_module" and n.target == "mlp" for n in gm.graph.nodes)
    assert "mlp.0.weight" not in {s.param for s in lora_fx.sites(gm)}  # opaque: adapt only on request
    gm = lora_fx.transform(model, rank=2, leaf_modules=["mlp"], targets=["mlp.0.weight", "out.weight"])
    assert lora_fx.sites(gm)[0].lowering == "merge"
    randomize_(gm)
    check_matches_reference(model, gm, (X,))


def test_deepcopy_and_pickle_keep_structure(tmp_path):
    import copy
    gm = randomize_(lora_fx.transform(_enc(), rank=2))
    y = gm(X)
    for other in (copy.deepcopy(gm), _roundtrip(gm, tmp_path)):
        assert isinstance(other.layers, nn.ModuleList)
        assert set(other.state_dict()) == set(gm.state_dict())
        assert torch.equal(other(X), y)
        assert [s.param for s in lora_fx.sites(other)] == [s.param for s in lora_fx.sites(gm)]
        with pytest.raises(AssertionError, match="mask"):  # the None guard survives
            other.layers[0](X, mask=torch.ones(1))
    # unpickling a block traced with mask=None must not break later traces in this process
    torch.fx.symbolic_trace(nn.Linear(2, 2))
    lora_fx.transform(nn.Sequential(nn.Linear(2, 3)), rank=1)


def _roundtrip(gm, tmp_path):
    path = tmp_path / "gm.pt"
    torch.save(gm, path)
    return torch.load(path, weights_only=False)


def test_module_list_of_leaf_layers_stays_plain():
    """A ModuleList of nn.Linear: the layers are leaves (not blocks) and are adapted in place."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

        def forward(self, x):
            for layer in self.layers:
                x = torch.tanh(layer(x))
            return x

    torch.manual_seed(0)
    model = Net()
    gm = lora_fx.transform(model, rank=2)
    assert isinstance(gm.layers, nn.ModuleList) and all(type(m) is nn.Linear for m in gm.layers)
    assert [s.param for s in lora_fx.sites(gm)] == ["layers.0.weight", "layers.1.weight"]
    randomize_(gm)
    check_matches_reference(model, gm, (torch.randn(3, 4),))


def test_layer_shared_by_two_blocks_one_adapter():
    """One nn.Linear owned by two blocks (cross-layer sharing): one adapter, one Site listing both
    names, every call sees the same delta; fold adds it once."""

    class Blk(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.shared = shared
            self.own = nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.own(self.shared(x)))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            sh = nn.Linear(4, 4)
            self.layers = nn.ModuleList([Blk(sh), Blk(sh)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 4)
    gm = lora_fx.transform(model, rank=2)
    sites = lora_fx.sites(gm)
    assert len(sites) == 3
    assert sites[0].aliases == ("layers.0.shared.weight", "layers.1.shared.weight") and len(sites[0].ops) == 2
    assert gm.layers[0].shared.lora.default.weight is gm.layers[1].shared.lora.default.weight
    randomize_(gm)
    check_matches_reference(model, gm, (x,))
    folded = lora_fx.fold(gm)
    fresh = Net()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert_close(fresh(x), gm(x))
