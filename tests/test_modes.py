"""Train / eval mode: mode switches change nothing but what the mode means (CASES.md case 1), the
adapted model follows the model's modes (per block, whatever the mode at transform), and a root
forward that branches on ``self.training`` is refused."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from _reference import check_matches_reference, randomize_
from lora_fx.errors import TraceError


class Case1(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(100, 32)  # non-square
        self.pos = nn.Embedding(32, 32)   # square: a missing transpose would go unnoticed in shape
        self.fc = nn.Linear(64, 32)
        self.drop = nn.Dropout(0.0)

    def forward(self, idx, pos):
        return self.fc(self.drop(torch.cat([self.tok(idx), self.pos(pos)], -1)))


@pytest.mark.parametrize("lowering", ["merge", "factored"])
def test_case1_mode_switches_identical(lowering):
    """CASES.md 1: non-square and square embeddings and a Linear, non-zero adapters, dropout 0:
    train / eval / train give identical outputs, no weight changes in place, the right function."""
    model = Case1()
    idx = torch.randint(0, 100, (3, 7))
    pos = torch.arange(7).expand(3, 7)
    gm = randomize_(lora_fx.transform(model, rank=4, alpha=8, dropout=0.0, lowering=lowering))
    assert {s.param for s in lora_fx.sites(gm)} == {"tok.weight", "pos.weight", "fc.weight"}
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    gm.train()
    y_train = gm(idx, pos)
    gm.eval()
    y_eval = gm(idx, pos)
    gm.train()
    y_train2 = gm(idx, pos)
    assert torch.equal(y_train, y_eval) and torch.equal(y_eval, y_train2)
    for k, v in gm.state_dict().items():
        assert torch.equal(v, weights[k]), k  # nothing merged in place by a mode switch
    # and it is the right function, square embedding included
    for mode in ("train", "eval"):
        getattr(gm, mode)()
        check_matches_reference(model, gm, (idx, pos))


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand(x.shape[0], 1) > self.p).to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.dp = DropPath(0.5)

    def forward(self, x):
        return x + self.dp(F.dropout(self.fc(x), 0.3, self.training))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_self_training_follows_mode_whatever_mode_at_transform(mode):
    model = getattr(Net(), mode)()
    gm = lora_fx.transform(model, rank=2)
    assert isinstance(gm.blocks[0].dp, DropPath)  # branching module kept as a called leaf
    x = torch.randn(5, 6)
    gm.eval(), model.eval()
    assert torch.equal(gm(x), model(x))
    gm.train(), model.train()
    torch.manual_seed(1)
    a = gm(x)
    torch.manual_seed(1)
    assert torch.equal(a, model(x))
    assert {s.param for s in lora_fx.sites(gm)} == {"blocks.0.fc.weight", "blocks.1.fc.weight", "head.weight"}


def test_root_branching_on_training_is_refused_with_advice():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) * (2 if self.training else 1)

    model = Root()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TraceError, match="self.training"):
        lora_fx.transform(model, rank=2, frontend="fx")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adapters_follow_model_mode_at_transform():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    gm = lora_fx.transform(model, rank=2, dropout=0.5)
    assert not any(m.training for m in gm.modules())
    randomize_(gm)
    x = torch.randn(8, 4)
    assert torch.equal(gm(x), gm(x))


def test_block_in_eval_mode_stays_in_eval_mode():
    """transform kept only the root's mode: a block (and its dropout) put in eval() in a model in
    training mode came back in training mode, so its dropout ran."""

    class Blk(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.fc(x))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Blk(), Blk()])
            self.head = nn.Linear(4, 2)
            self.head_drop = nn.Dropout(0.5)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head_drop(self.head(x))

    model = Stack()
    model.blocks[1].eval()
    model.head_drop.eval()
    gm = lora_fx.transform(model, rank=2)
    assert {n: m.training for n, m in gm.named_modules() if "lora" not in n} == {
        n: m.training for n, m in model.named_modules()}
