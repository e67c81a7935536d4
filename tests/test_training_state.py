"""Freezing (loralib's ``mark_only_lora_as_trainable`` semantics), adapter-only state dicts, and
base parameters that stay bit-identical while the adapters train."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from _reference import check_matches_reference, randomize_
from lora_fx.errors import ConfigError


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 3)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.proj = nn.Conv1d(8, 3, 1, groups=1)
        self.fc = nn.Linear(8 * 5, 6)
        self.head = nn.Linear(6, 4)
        self.w = nn.Parameter(torch.randn(4, 4) * 0.3)

    def forward(self, idx):
        x = self.emb(idx).transpose(1, 2)  # (N, 3, L)
        x = self.blocks[0](x)
        x = self.blocks[1](self.proj(x))
        return F.gelu(self.head(torch.tanh(self.fc(x.flatten(1))))) @ self.w


def _net():
    torch.manual_seed(0)
    return Net()


IDX = torch.tensor([[1, 5, 7, 19, 0], [3, 3, 2, 8, 11]])
TARGETS = ["emb.weight", "blocks.*.conv.weight", "fc.weight", "w", "proj.weight"]


def _is_adapter(name):
    return name.endswith((".lora_A", ".lora_B"))


def _trainable(gm):
    return {n for n, p in gm.named_parameters() if p.requires_grad}


def test_transform_freezes_everything_but_adapters():
    gm = lora_fx.transform(_net(), rank=2, targets=TARGETS)
    assert _trainable(gm) == {n for n in gm.state_dict() if n.endswith((".lora_A", ".lora_B"))}
    assert len(_trainable(gm)) == 2 * 6


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_mark_only_lora_as_trainable_bias_modes(bias):
    gm = lora_fx.transform(_net(), rank=2, targets=TARGETS)
    for p in gm.parameters():
        p.requires_grad_(True)
    assert lora_fx.mark_only_lora_as_trainable(gm, bias=bias) is gm
    adapters = {n for n in gm.state_dict() if n.endswith((".lora_A", ".lora_B"))}
    expected = set(adapters)
    if bias == "all":
        expected |= {n for n, _ in gm.named_parameters() if n.endswith(".bias")}
        assert "blocks.0.norm.bias" in expected and "head.bias" in expected
    elif bias == "lora_only":  # biases of adapted modules only
        expected |= {"blocks.0.conv.bias", "blocks.1.conv.bias", "fc.bias", "proj.bias"}
    assert _trainable(gm) == expected


def test_mark_only_lora_as_trainable_rejects_unknown_bias():
    gm = lora_fx.transform(_net(), rank=2, targets=TARGETS)
    with pytest.raises(ConfigError, match="bias"):
        lora_fx.mark_only_lora_as_trainable(gm, bias="some")


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_lora_state_dict_round_trip_exact(bias):
    model = _net()
    gm = randomize_(lora_fx.transform(model, rank=2, targets=TARGETS))
    with torch.no_grad():
        for n, p in gm.named_parameters():
            if n.endswith("bias"):
                p.add_(0.25)  # trained biases
    sd = lora_fx.lora_state_dict(gm, bias=bias)
    lora_keys = {k for k in sd if _is_adapter(k)}
    assert lora_keys == {n for n in gm.state_dict() if n.endswith((".lora_A", ".lora_B"))}
    bias_keys = set(sd) - lora_keys
    if bias == "none":
        assert not bias_keys
    elif bias == "lora_only":
        assert bias_keys == {"blocks.0.conv.bias", "blocks.1.conv.bias", "fc.bias", "proj.bias"}
    else:
        assert bias_keys == {n for n in gm.state_dict() if n.endswith(".bias")}

    fresh = lora_fx.transform(model, rank=2, targets=TARGETS)
    res = fresh.load_state_dict(sd, strict=False)
    assert not res.unexpected_keys
    assert set(res.missing_keys) == set(gm.state_dict()) - set(sd)
    fsd = fresh.state_dict()
    for k, v in sd.items():
        assert torch.equal(fsd[k], v), k
    if bias == "all":
        assert torch.equal(fresh(IDX), gm(IDX))
    # reference: the original model with the saved biases, plus W + s·B@A from the saved factors
    ref = copy.deepcopy(model)
    ref.load_state_dict({k: v for k, v in sd.items() if not _is_adapter(k)}, strict=False)
    check_matches_reference(ref, fresh, (IDX,))


@pytest.mark.parametrize("lowering", ["merge", "factored"])
def test_base_parameters_bit_identical_after_adamw_with_weight_decay(lowering):
    model = _net()
    gm = lora_fx.transform(model, rank=2, targets=TARGETS, lowering=lowering)
    base = {n: p.detach().clone() for n, p in gm.named_parameters() if not _is_adapter(n)}
    buffers = {n: b.clone() for n, b in gm.named_buffers()}
    lora0 = {n: p.detach().clone() for n, p in gm.named_parameters() if _is_adapter(n)}
    # every parameter goes to the optimizer, as users often do: frozen ones must stay untouched
    opt = torch.optim.AdamW(gm.parameters(), lr=1e-2, weight_decay=0.1)
    y = torch.randn(2, 4)
    for _ in range(4):
        loss = F.mse_loss(gm(IDX), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in gm.named_parameters():
        if _is_adapter(n):
            continue
        assert torch.equal(p, base[n]), n
        assert p.grad is None and not p.requires_grad, n
        assert not opt.state.get(p), n  # no optimizer state for frozen weights
    for n, b in gm.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert all(not torch.equal(p, lora0[n]) for n, p in gm.named_parameters() if n.endswith("lora_B"))
    # and the trained adapter still matches the functional reference
    check_matches_reference(model, gm, (IDX,))


def test_adapter_parameters_lists_only_adapters():
    gm = lora_fx.transform(_net(), rank=2, targets=TARGETS)
    params = lora_fx.adapter_parameters(gm)
    names = {n for n, p in gm.named_parameters() if any(p is q for q in params)}
    assert names == {n for n in gm.state_dict() if n.endswith((".lora_A", ".lora_B"))}


def test_user_parameter_named_like_lora_is_not_an_adapter():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.flora_w = nn.Parameter(torch.randn(3, 3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) @ self.flora_w

    gm = lora_fx.transform(M(), rank=2, targets=["fc.weight"])
    lora_fx.mark_only_lora_as_trainable(gm)
    assert not gm.flora_w.requires_grad
    assert "flora_w" not in lora_fx.lora_state_dict(gm)
