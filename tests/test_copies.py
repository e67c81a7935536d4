"""Copies of an adapted module: ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load``
keep outputs, adapter metadata, tied parameters, the lora_fx graph ops, and stay independent."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import ops
from lora_fx.graph_module import LoraGraphModule
from _tolerance import assert_close


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc = nn.Linear(d, 2 * d)
        self.proj = nn.Parameter(torch.randn(2 * d, d) / d)

    def forward(self, h):
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return h + F.gelu(self.fc(h)) @ self.proj


class TinyLM(nn.Module):
    """Embedding tied to the output head, two blocks in a ModuleList (each its own GraphModule), a conv."""

    def __init__(self, vocab=11, d=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.layers = nn.ModuleList([Block(d) for _ in range(2)])
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def _copies():
    def deep(m):
        return copy.deepcopy(m)

    def pickled(m):
        return pickle.loads(pickle.dumps(m))

    def torch_saved(m):
        buf = io.BytesIO()
        torch.save(m, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    def twice(m):
        return pickled(deep(pickled(m)))

    return [deep, pickled, torch_saved, twice]


@pytest.fixture
def adapted():
    torch.manual_seed(0)
    model = TinyLM()
    gm = lora_fx.transform(model, rank=3, alpha=6)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_B.normal_()
    return model, gm


def _lora_targets(gm):
    return [n.target for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
            for n in m.graph.nodes if n.op == "call_function" and n.target in ops.LORA_OPS]


def _site_view(gm):
    return [(s.param, s.aliases, s.adapter, s.op, s.lowering, s.shape, s.rank, s.alpha, s.scaling, s.path)
            for s in lora_fx.sites(gm)]


@pytest.mark.parametrize("make_copy", _copies(), ids=lambda f: f.__name__)
def test_copy_keeps_everything(adapted, make_copy):
    model, gm = adapted
    x = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        y = gm(x)
        ye = gm.eval()(x)  # eval: nn.MultiheadAttention's fast path (another kernel)
        gm.train()
    c = make_copy(gm)

    assert isinstance(c, LoraGraphModule)
    assert all(isinstance(c.get_submodule(f"layers.{i}"), LoraGraphModule) for i in range(2))
    with torch.no_grad():
        assert torch.equal(c(x), y)
    assert c.state_dict().keys() == gm.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(c.state_dict().values(), gm.state_dict().values()))
    # adapter metadata: sites, configs, records
    assert _site_view(c) == _site_view(gm)
    assert getattr(c, "_lora_fx_configs") == getattr(gm, "_lora_fx_configs")
    # tied parameters are still one object, and its adapter is shared
    assert c.emb.weight is c.head.weight
    assert c.emb.lora.default.weight is next(s.module for s in lora_fx.sites(c) if s.param == "emb.weight")
    # the generated code still calls the lora_fx ops as call_function nodes (re-traced on unpickle)
    assert _lora_targets(c) == _lora_targets(gm) and ops.linear_delta in _lora_targets(c)
    assert ops.merge in _lora_targets(c) and ops.module_call in _lora_targets(c)
    # requires_grad survives; freeze, train/eval, backward and fold keep working
    assert {n: p.requires_grad for n, p in c.named_parameters()} == \
        {n: p.requires_grad for n, p in gm.named_parameters()}
    lora_fx.mark_only_lora_as_trainable(c)
    assert {n for n, p in c.named_parameters() if p.requires_grad} == \
        {n for n, p in gm.named_parameters() if "lora_" in n}
    c.eval()
    assert not any(m.training for m in c.modules())
    with torch.no_grad():
        assert torch.equal(c(x), ye)
    c.train()
    assert all(m.training for m in c.modules())
    c(x).square().mean().backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in c.named_parameters())
    folded = lora_fx.fold(c)
    assert not _lora_targets(folded)
    with torch.no_grad():
        assert_close(folded(x), y)
        plain = copy.deepcopy(model).requires_grad_(False)
        plain.load_state_dict(folded.state_dict(), strict=True)
        assert torch.equal(plain(x), folded(x))
    assert all(p.grad is None for p in gm.parameters())  # the original saw none of this


@pytest.mark.parametrize("make_copy", _copies(), ids=lambda f: f.__name__)
def test_copy_is_independent(adapted, make_copy):
    _, gm = adapted
    x = torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        y = gm(x)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    c = make_copy(gm)
    site = lora_fx.sites(c)[0]
    with torch.no_grad():
        for s in lora_fx.sites(c):
            s.lora_B.add_(1.0)
            s.lora_A.mul_(2.0)
    site.module.enabled = False
    site.module.refresh_scaling_()
    lora_fx.sites(c)[1].module.lora_A.requires_grad_(False)
    with torch.no_grad():
        assert not torch.equal(c(x), y)
        assert torch.equal(gm(x), y)
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in before.items())
    assert lora_fx.sites(gm)[0].scaling == 2.0 and lora_fx.sites(gm)[1].lora_A.requires_grad
    # the original's adapters are not the copy's
    ids = {id(p) for p in gm.parameters()}
    assert not any(id(p) in ids for p in c.parameters())


def test_pickle_of_folded_and_of_block(adapted):
    _, gm = adapted
    x = torch.randint(0, 11, (2, 5))
    folded = lora_fx.fold(gm)
    again = pickle.loads(pickle.dumps(folded))
    with torch.no_grad():
        assert torch.equal(again(x), folded(x))
    assert again.emb.weight is again.head.weight
    block = pickle.loads(pickle.dumps(gm.layers[0]))
    h = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(block(h), gm.layers[0](h))
    assert lora_fx.sites(block) and ops.merge in _lora_targets(block)
