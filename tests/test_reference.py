"""The shared functional reference (tests/_reference.py) against formulas written out by hand: if
it were wrong, every test comparing with it would be wrong the same way."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from _reference import leaf_factors, randomize_, reference_call, reference_overrides
from _tolerance import assert_close


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.qkv = nn.Linear(4, 9, bias=False)

    def forward(self, x):
        return self.qkv(torch.tanh(self.fc(x)))


def test_plain_fused_and_rslora_by_hand():
    model = Two()
    fused = {"qkv.weight": {"blocks": {"q": 3, "k": 2, "v": 4}, "enable": ("q", "v")}}
    gm = randomize_(lora_fx.transform(model, rank=2, alpha=3, use_rslora=True, fused=fused))
    x = torch.randn(3, 5)
    s = 3 / math.sqrt(2)
    fc, qkv = (lora_fx.sites(gm)[i] for i in (0, 1))
    w_fc = model.fc.weight + s * fc.lora_B @ fc.lora_A
    a, b = qkv.lora_A, qkv.lora_B  # q: A[:2], B[:3]; v: A[2:], B[3:]
    w_qkv = model.qkv.weight + s * torch.cat([b[:3] @ a[:2], torch.zeros(2, 4), b[3:] @ a[2:]])
    want = F.linear(torch.tanh(F.linear(x, w_fc, model.fc.bias)), w_qkv)
    assert_close(reference_call(model, gm, (x,)), want)
    assert_close(gm(x), want)


def test_mixing_weights_and_leaf_gradients_by_hand():
    model = nn.Sequential(nn.Linear(4, 3))
    gm = lora_fx.transform(model, rank=2, alpha=4)
    lora_fx.add_adapter(gm, "b", rank=1, alpha=3)
    randomize_(gm)
    (d, e) = lora_fx.sites(gm)
    x = torch.randn(2, 4)
    w = model[0].weight + 0.5 * 2.0 * d.lora_B @ d.lora_A - 1.5 * 3.0 * e.lora_B @ e.lora_A
    assert_close(reference_call(model, gm, (x,), weights={"default": 0.5, "b": -1.5}), F.linear(x, w, model[0].bias))
    leaves = leaf_factors(gm)
    ref = reference_call(model, gm, (x,), factors=leaves)  # "b" was added inactive: scaling 0
    a, b = leaves["0.weight", "default"]
    ref.square().sum().backward()
    want = torch.autograd.grad(F.linear(x, model[0].weight + 2.0 * d.lora_B @ d.lora_A, model[0].bias).square().sum(),
                               [d.lora_A, d.lora_B])
    assert_close([a.grad, b.grad], list(want))
    assert not leaves["0.weight", "b"][0].grad.any()


def test_dora_by_hand():
    model = nn.Sequential(nn.Linear(6, 4))
    gm = randomize_(lora_fx.transform(model, rank=2, use_dora=True), magnitude=0.3)
    (s,) = lora_fx.sites(gm)
    v = model[0].weight + s.lora_B @ s.lora_A
    want = s.module.lora_magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
    assert_close(reference_overrides(model, gm)["0.weight"], want)


def test_tied_aliases_get_one_tensor_and_the_model_is_restored():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight
            self.again = self.head  # the head registered under a second path

        def forward(self, idx):
            return self.again(torch.tanh(self.emb(idx)))

    model = M()
    gm = randomize_(lora_fx.transform(model, rank=2))
    over = reference_overrides(model, gm, tie_all=True)
    assert set(over) == {"emb.weight", "head.weight", "again.weight"}
    assert over["emb.weight"] is over["head.weight"] is over["again.weight"]
    ids = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}
    idx = torch.tensor([[1, 6, 0]])
    assert_close(reference_call(model, gm, (idx,), tie_all=True), gm(idx))
    assert {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)} == ids
