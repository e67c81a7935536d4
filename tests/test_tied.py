"""Shared and tied parameters: a site is a (parameter, consuming call) pair; one adapter per
parameter object; fold keeps ties (every name of a folded parameter object that no unadapted
consumer reads points at the folded tensor, so the folded state dict loads ``strict=True`` into
the original class) and unties only what an unadapted consumer still reads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx.io import load_lora_state, save_lora_state
from _reference import leaf_factors, randomize_, reference_call, set_factors_
from _tolerance import assert_close

VOCAB, D = 50, 16


class TiedLM(nn.Module):
    """Embedding and lm_head share one Parameter (GPT-2 style)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.body = nn.Linear(D, D)
        self.head = nn.Linear(D, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        return h, self.head(torch.tanh(self.body(h)))


def _adapt(model, targets, **kw):
    gm = lora_fx.transform(model, rank=3, alpha=6.0, targets=targets, **kw)
    for i, s in enumerate(lora_fx.sites(gm)):
        set_factors_(s, seed=30 + i)
    return gm


def _check(model, gm, idx, names):
    """Outputs and factor gradients against the reference, whose ``W + s·B@A`` (one tensor) is
    given for exactly the targeted aliases ``names``."""
    (site,) = lora_fx.sites(gm)
    assert sorted(site.aliases) == sorted(names)
    h, logits = gm(idx)
    leaves = leaf_factors(gm)
    a, b = leaves[site.param, site.adapter]
    rh, rlogits = reference_call(model, gm, (idx,), factors=leaves)
    g = torch.randn(logits.shape)
    ((logits * g).sum() + h.square().sum()).backward()
    ((rlogits * g).sum() + rh.square().sum()).backward()
    assert_close(h, rh)
    assert_close(logits, rlogits)
    assert_close(site.lora_A.grad, a.grad)
    assert_close(site.lora_B.grad, b.grad)
    return h, logits


def test_every_alias_targeted_shares_one_adapter_and_keeps_the_tie():
    model = TiedLM()
    idx = torch.randint(0, VOCAB, (2, 7))
    gm = _adapt(model, ["emb.weight", "head.weight"])
    (site,) = lora_fx.sites(gm)
    assert set(site.aliases) == {"emb.weight", "head.weight"}
    assert site.ops == ("embedding", "linear")
    assert sum(isinstance(m, lora_fx.LoraAdapter) for m in gm.modules()) == 1
    assert gm.emb.weight is gm.head.weight  # base tie kept
    _check(model, gm, idx, ["emb.weight", "head.weight"])
    folded = lora_fx.fold(gm)
    assert folded.meta["lora_fx"]["untied"] == []
    assert sorted(folded.meta["lora_fx"]["folded"]) == ["emb.weight", "head.weight"]
    assert folded.emb.weight is folded.head.weight  # folded tie kept
    with torch.no_grad():
        assert_close(folded(idx), gm(idx))
    plain = TiedLM()
    plain.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        assert_close(plain(idx)[1], gm(idx)[1])


@pytest.mark.parametrize("target, other", [("head.weight", "emb"), ("emb.weight", "head")])
def test_one_alias_targeted_adapts_only_its_consumer(target, other):
    model = TiedLM()
    idx = torch.randint(0, VOCAB, (2, 7))
    gm = _adapt(model, [target])
    (site,) = lora_fx.sites(gm)
    assert site.aliases == (target,)
    h, logits = _check(model, gm, idx, [target])
    base_h, base_logits = model(idx)
    if other == "emb":
        assert torch.equal(h, base_h)  # the untargeted consumer's outputs are bit-identical
    else:
        assert not torch.equal(h, base_h)
        # the head sees the base weight: logits == head(tanh(body(h_adapted))) with W unchanged
        assert torch.equal(logits, model.head(torch.tanh(model.body(h))))
    folded = lora_fx.fold(gm)
    assert folded.meta["lora_fx"]["untied"] == [target]
    assert folded.emb.weight is not folded.head.weight
    other_w = folded.get_parameter(f"{other}.weight")
    assert torch.equal(other_w, model.emb.weight)  # the other alias keeps the original values
    with torch.no_grad():
        assert_close(folded(idx), gm(idx))


def test_fold_never_writes_into_shared_storage():
    model = TiedLM()
    before = model.emb.weight.detach().clone()
    gm = _adapt(model, ["head.weight"], copy_weights=False)
    assert gm.emb.weight.data_ptr() == model.emb.weight.data_ptr()  # shared with the user's model
    folded = lora_fx.fold(gm)
    assert torch.equal(model.emb.weight, before) and torch.equal(gm.emb.weight, before)
    assert folded.head.weight.data_ptr() != model.emb.weight.data_ptr()


@pytest.mark.parametrize("targets", [["emb.weight", "head.weight"], ["head.weight"]])
def test_tied_save_load_and_lora_state_dict_round_trip(tmp_path, targets):
    model = TiedLM()
    idx = torch.randint(0, VOCAB, (2, 7))
    gm = _adapt(model, targets)
    sd = lora_fx.lora_state_dict(gm)
    assert all(".lora." in k for k in sd)
    fresh = lora_fx.transform(model, rank=3, alpha=6.0, targets=targets)
    fresh.load_state_dict(sd, strict=False)
    assert all(torch.equal(a, b) for a, b in zip(fresh(idx), gm(idx)))
    path = save_lora_state(gm, tmp_path / "tied.safetensors")
    other = load_lora_state(lora_fx.transform(model, rank=3, alpha=6.0, targets=targets), path)
    assert all(torch.equal(a, b) for a, b in zip(other(idx), gm(idx)))
    assert other.emb.weight is other.head.weight


@pytest.mark.parametrize("targets", [["emb.weight", "head.weight"], ["head.weight"]])
def test_tied_torch_export_folded_and_unfolded(targets):
    model = TiedLM()
    idx = torch.randint(0, VOCAB, (2, 7))
    gm = _adapt(model, targets).eval()
    folded = lora_fx.fold(gm).eval()
    for mod in (gm, folded):
        ep = torch.export.export(mod, (idx,))
        with torch.no_grad():
            assert_close(ep.module()(idx), gm(idx))
    names = set(torch.export.export(folded, (idx,)).state_dict)
    assert not any("lora" in n for n in names)


class TwoUses(nn.Module):
    """One parameter read by two ops in one module: ``x @ W`` and ``z @ W.t()``."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 12) / 3)

    def forward(self, x, z):
        return x @ self.w, z @ self.w.t()


def test_parameter_read_by_several_ops_gets_one_adapter():
    model = TwoUses()
    gm = _adapt(model, ["w"])
    (site,) = lora_fx.sites(gm)
    assert sum(isinstance(m, lora_fx.LoraAdapter) for m in gm.modules()) == 1
    x, z = torch.randn(3, 8), torch.randn(3, 12)
    leaves = leaf_factors(gm)
    a, b = leaves["w", "default"]
    ref = reference_call(model, gm, (x, z), factors=leaves)
    out = gm(x, z)
    assert_close(out, ref)
    (out[0].sum() + out[1].square().sum()).backward()
    (ref[0].sum() + ref[1].square().sum()).backward()
    assert_close(site.lora_A.grad, a.grad)
    assert_close(site.lora_B.grad, b.grad)


class SharedBlocks(nn.Module):
    """One Linear object used by two ModuleList entries (ALBERT-style sharing across blocks) and a
    head tied to the first block's weight."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(D, D)
        self.layers = nn.ModuleList([shared, shared])
        self.head = nn.Linear(D, D, bias=False)
        self.head.weight = shared.weight

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def test_sharing_across_blocks_one_adapter_and_fold_keeps_tie():
    model = SharedBlocks()
    gm = _adapt(model, None)
    ws = {id(s.module) for s in lora_fx.sites(gm)}
    assert len(ws) == 1  # one parameter object, one adapter
    (site,) = [s for s in lora_fx.sites(gm)][:1]
    x = torch.randn(4, D)
    ref = reference_call(model, gm, (x,), tie_all=True)  # every name of the one object
    assert_close(gm(x), ref)
    folded = lora_fx.fold(gm)
    assert folded.meta["lora_fx"]["untied"] == []
    assert folded.head.weight is folded.layers[0].weight is folded.layers[1].weight
    with torch.no_grad():
        assert_close(folded(x), ref)


class TwoTies(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.fc = nn.Linear(6, 6)
        self.head_w = self.fc.weight  # second name of fc.weight, read by F.linear (fx reads it as fc.weight)
        self.head = nn.Linear(6, 9, bias=False)
        self.head.weight = self.emb.weight  # read by its own module call

    def forward(self, idx):
        h = torch.tanh(self.fc(self.emb(idx)))
        return self.head(F.linear(h, self.head_w))


def test_fold_all_aliases_targeted_stay_tied():
    model = TwoTies()
    gm = randomize_(lora_fx.transform(model, rank=2))
    idx = torch.randint(0, 9, (2, 4))
    folded = lora_fx.fold(gm)
    assert folded.fc.weight is folded.head_w and folded.emb.weight is folded.head.weight
    assert folded.meta["lora_fx"]["untied"] == []
    plain = copy.deepcopy(model).requires_grad_(False)
    plain.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(idx), folded(idx))
        assert_close(folded(idx), gm(idx))
        assert_close(folded(idx), reference_call(model, gm, (idx,), tie_all=True))


def test_fold_alias_read_by_unadapted_consumer_is_untied():
    model = TwoTies()
    gm = randomize_(lora_fx.transform(model, rank=2, targets=["emb.weight"]))  # head.weight (same object) is not
    idx = torch.randint(0, 9, (2, 4))
    with torch.no_grad():
        assert_close(gm(idx), reference_call(model, gm, (idx,)))
        folded = lora_fx.fold(gm)
        assert folded.meta["lora_fx"]["untied"] == ["emb.weight"]
        assert folded.emb.weight is not folded.head.weight
        assert torch.equal(folded.head.weight, model.head.weight)
        assert_close(folded(idx), gm(idx))
