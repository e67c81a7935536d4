"""fold(): equal to the adapted model and to the functional reference; original keys; strict load
into a fresh instance of the original class; refuses to fold twice; leaves gm unchanged; bf16
weights rounded once."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import lora_fx
from _checks import lora_node_counts
from _reference import lora_weight, randomize_, reference_call, reference_overrides
from _tolerance import assert_close
from _zoo import ZOO, case_ids
from lora_fx.errors import NotAdaptedError, UnsupportedSiteError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, (3, 2), padding=(1, 0), padding_mode="reflect")
        self.conv2 = nn.Conv2d(5, 3, 1)
        self.up = nn.ConvTranspose2d(3, 3, 2, stride=1, groups=3)

    def forward(self, x, mask=None):
        h = self.conv2(F.relu(self.conv(x)))
        if mask is not None:
            h = h * mask
        return self.up(x[..., :-1] + h)[..., :-1, :]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 12)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.fc = nn.Linear(3 * 4 * 4, 7)
        self.w = nn.Parameter(torch.randn(7, 5) * 0.2)
        self.register_buffer("shift", torch.linspace(-1, 1, 12))

    def forward(self, idx):
        x = (self.emb(idx) + self.shift).view(-1, 3, 4, 4)[..., :4]
        for b in self.blocks:
            x = b(x)
        return torch.matmul(self.fc(x.flatten(1)), self.w)


def _net():
    torch.manual_seed(0)
    return Net()


IDX = torch.tensor([[1, 5, 7], [3, 3, 0], [9, 2, 4], [8, 1, 1]])


def _adapted(model, **kw):
    return randomize_(lora_fx.transform(model, rank=2, **kw), scale=0.3)


@pytest.mark.parametrize("lowering", ["merge", "factored"])
def test_fold_equals_adapted_and_reference_and_loads_strict(lowering):
    model = _net()
    gm = _adapted(model, lowering=lowering)
    y = gm(IDX)
    sd_before = {k: v.clone() for k, v in gm.state_dict().items()}
    folded = lora_fx.fold(gm)

    assert_close(folded(IDX), y)
    assert_close(folded(IDX), reference_call(model, gm, (IDX,)))
    assert list(folded.state_dict()) == list(model.state_dict())
    assert not lora_node_counts(folded)
    assert not any(isinstance(m, lora_fx.LoraAdapter) for m in folded.modules())
    assert not any("lora" in n for n, _ in folded.named_modules())
    for g in folded.modules():
        if isinstance(g, fx.GraphModule):
            g.graph.lint()
    assert isinstance(folded.blocks, nn.ModuleList)
    assert sorted(folded.meta["lora_fx"]["folded"]) == sorted(s.param for s in lora_fx.sites(gm))

    # strict load into a fresh instance of the original class (torchtune's fold test)
    fresh = Net()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert_close(fresh(IDX), y)
    ref = reference_overrides(model, gm)
    for k, v in folded.state_dict().items():
        assert torch.equal(v, ref[k] if k in ref else model.state_dict()[k]), k

    # gm itself keeps working, unchanged
    assert torch.equal(gm(IDX), y)
    for k, v in gm.state_dict().items():
        assert torch.equal(v, sd_before[k]), k
    assert lora_fx.sites(gm)


def test_fold_twice_and_untransformed_raise():
    model = _net()
    folded = lora_fx.fold(_adapted(model))
    with pytest.raises(NotAdaptedError, match="nothing to fold"):
        lora_fx.fold(folded)
    with pytest.raises(NotAdaptedError):
        lora_fx.fold(model)
    with pytest.raises(NotAdaptedError):
        lora_fx.fold(fx.symbolic_trace(nn.Linear(2, 2)))
    with pytest.raises(NotAdaptedError):
        lora_fx.sites(folded)
    # a folded model can be adapted again (a second round of LoRA on the merged weights)
    gm2 = lora_fx.transform(folded, rank=2, targets=["fc.weight"])
    assert torch.equal(gm2(IDX), folded(IDX))


def test_fold_is_a_deep_copy():
    gm = _adapted(_net())
    folded = lora_fx.fold(gm)
    ids = {id(p) for p in gm.parameters()} | {id(b) for b in gm.buffers()}
    assert not any(id(p) in ids for p in folded.parameters())
    assert not any(id(b) in ids for b in folded.buffers())
    with torch.no_grad():
        folded.fc.bias.add_(1.0)
    assert not torch.equal(gm.fc.bias, folded.fc.bias)


def test_fold_bf16_one_rounding():
    model = _net().to(torch.bfloat16)
    gm = _adapted(model, lowering="merge")
    folded = lora_fx.fold(gm)
    for s in lora_fx.sites(gm):
        w = model.get_parameter(s.param)
        expected = lora_weight(w, s.lora_A.detach(), s.lora_B.detach(), s.scaling)  # fp32, rounded once to bf16
        got = folded.get_parameter(s.param)
        assert got.dtype == torch.bfloat16
        assert torch.equal(got, expected), s.param
    assert_close(folded(IDX), gm(IDX), dtype=torch.bfloat16)


def test_fold_disabled_adapter_adds_nothing():
    model = _net()
    gm = _adapted(model)
    for s in lora_fx.sites(gm):
        s.module.enabled = False
        s.module.refresh_scaling_()
    assert torch.equal(gm(IDX), model(IDX))
    folded = lora_fx.fold(gm)
    for k, v in model.state_dict().items():
        assert torch.equal(folded.state_dict()[k], v), k


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


def test_fold_tied_weight_folded_once():
    torch.manual_seed(0)
    model = Tied()
    idx = torch.randint(0, 11, (2, 5))
    gm = _adapted(model, lowering="factored")
    folded = lora_fx.fold(gm)
    assert folded.emb.weight is folded.head.weight  # still tied, delta added once
    assert folded.meta["lora_fx"]["untied"] == []
    ref = reference_overrides(model, gm)
    assert torch.equal(folded.emb.weight, ref["emb.weight"])
    fresh = Tied()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert_close(fresh(idx), gm(idx))


def test_fold_tied_weight_one_alias_targeted_unties():
    torch.manual_seed(0)
    model = Tied()
    idx = torch.randint(0, 11, (2, 5))
    gm = _adapted(model, targets=["head.weight"])
    folded = lora_fx.fold(gm)
    assert folded.meta["lora_fx"]["untied"] == ["head.weight"]
    assert torch.equal(folded.emb.weight, model.emb.weight)
    assert_close(folded(idx), gm(idx))
    assert_close(folded(idx), reference_call(model, gm, (idx,)))


def test_fold_shared_block_instance():
    """One block module used at two places of a ModuleList: its weight is folded once."""

    class Net2(nn.Module):
        def __init__(self):
            super().__init__()
            blk = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
            self.layers = nn.ModuleList([blk, blk])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    torch.manual_seed(0)
    model = Net2()
    x = torch.randn(3, 4)
    gm = _adapted(model)
    y = gm(x)
    assert_close(y, reference_call(model, gm, (x,)))
    folded = lora_fx.fold(gm)
    assert_close(folded(x), y)
    fresh = Net2()
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert_close(fresh(x), y)


FOLD_CASES = [ZOO[n] for n in (
    "Linear", "Embedding-freq-pad", "Conv1d-circular", "Conv2d-groups", "Conv3d", "ConvTranspose2d-groups",
    "F.linear", "F.embedding", "F.conv2d-same", "F.conv_transpose3d", "matmul-left", "matmul-t-view",
    "matmul-batched-param", "addmm-right", "MHA-fused", "MHA-kdim", "F.embedding-neg-pad")]


@pytest.mark.parametrize("case", FOLD_CASES, ids=case_ids(FOLD_CASES))
def test_fold_every_site_kind(case):
    model = case.make()
    inputs = case.inputs()
    gm = _adapted(model, lowering="factored", **case.kw)
    folded = lora_fx.fold(gm)
    assert not lora_node_counts(folded)
    assert list(folded.state_dict()) == list(model.state_dict())
    assert_close(folded(*inputs), reference_call(model, gm, inputs))
    assert_close(folded(*inputs), gm(*inputs))
    fresh = copy.deepcopy(model)
    fresh.load_state_dict(folded.state_dict(), strict=True)
    assert_close(fresh(*inputs), gm(*inputs))


def test_fold_refuses_to_untie_a_module_shared_by_blocks():
    class Blk(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            sh = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([Blk(sh), Blk(sh)])

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x))

    gm = randomize_(lora_fx.transform(M(), rank=2, targets=["blocks.0.shared.weight"]))
    with pytest.raises(UnsupportedSiteError, match="blocks.1.shared.weight"):
        lora_fx.fold(gm)
    both = randomize_(lora_fx.transform(M(), rank=2))
    x = torch.randn(2, 4)
    assert_close(lora_fx.fold(both)(x), both(x))


def test_fold_opaque_leaf_becomes_plain_call():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose1d(4, 3, 3, stride=2, padding=1)

        def forward(self, x):
            return self.up(x, output_size=[10])

    torch.manual_seed(0)
    model = M()
    x = torch.randn(2, 4, 5)
    gm = _adapted(model)
    folded = lora_fx.fold(gm)
    assert [n.op for n in folded.graph.nodes] == ["placeholder", "call_module", "output"]
    assert_close(folded(x), gm(x))
