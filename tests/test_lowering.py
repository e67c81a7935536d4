"""Per-site lowering choice (factored where exact and cheaper, merge elsewhere) and LoRA dropout
placement, against the functional reference (tests/_reference.py); the numeric parity of every
site kind under every lowering is tests/test_sites.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import ops

from _checks import graph_modules
from _reference import lora_weight, randomize_, reference_call
from _tolerance import assert_close, assert_not_close
from _zoo import SITES, Wrap, build, case_ids, expected_lowering


@pytest.mark.parametrize("case", SITES, ids=case_ids())
def test_lowering_choice_per_site(case):
    for lowering in ("auto", "merge", "factored"):  # factored where exact, merge elsewhere
        model, _ = build(case)
        gm = lora_fx.transform(model, rank=2, alpha=3, lowering=lowering, **case.kw)
        sites = lora_fx.sites(gm)
        want = [expected_lowering(case, lowering, 2, s.shape) for s in sites]
        assert [s.lowering for s in sites] == want, (lowering, [s.param for s in sites])
        calls = [n.target for g in graph_modules(gm) for n in g.graph.nodes if n.op == "call_function"]
        n_delta = sum(t in ops.DELTA_OPS for t in calls)
        n_merge = sum(t is ops.merge for t in calls)
        assert n_delta == want.count("factored") and n_merge == want.count("merge")


def test_auto_merges_conv_when_rank_is_not_small():
    model = Wrap(nn.Conv2d(3, 4, 1))  # fan_in 3: rank 2 is not cheaper factored
    assert lora_fx.sites(lora_fx.transform(model, rank=2))[0].lowering == "merge"
    assert lora_fx.sites(lora_fx.transform(model, rank=2, lowering="factored"))[0].lowering == "factored"


# --------------------------------------------------------------------------------------------
# dropout


class _Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = nn.Linear(12, 10)

    def forward(self, x):
        return self.m(x)


class _Up(nn.Module):
    def __init__(self):
        super().__init__()
        self.m = nn.ConvTranspose2d(4, 6, 3, stride=2)

    def forward(self, x):
        return self.m(x)


def _dropout_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith(".dropout")]


@pytest.mark.parametrize("lowering", ["factored", "merge"])
def test_dropout_zero_inserts_nothing(lowering):
    gm = lora_fx.transform(_Lin(), rank=2, lowering=lowering, dropout=0.0)
    assert not _dropout_nodes(gm)
    assert not any(isinstance(m, nn.Dropout) for m in gm.modules())


def test_dropout_factored_is_on_branch_input_and_follows_mode():
    p = 0.5
    model = _Lin()
    x = torch.randn(3, 5, 12)
    gm = randomize_(lora_fx.transform(model, rank=2, alpha=3, lowering="factored", dropout=p))
    (node,) = _dropout_nodes(gm)
    (user,) = node.users
    assert user.target is ops.linear_delta and user.args[1] is node  # the branch input, not the base path
    s = lora_fx.sites(gm)[0]
    W, b = model.m.weight, model.m.bias

    def manual(drop_x):
        return F.linear(x, W, b) + float(s.scaling) * (drop_x @ s.lora_A.detach().T) @ s.lora_B.detach().T

    gm.train()
    torch.manual_seed(123)
    out = gm(x)
    torch.manual_seed(123)
    want = manual(F.dropout(x, p, training=True))
    assert_close(out, want)
    assert_not_close(out, manual(x))  # dropout acted
    gm.eval()
    assert_close(gm(x), manual(x))
    assert_close(gm(x), reference_call(model, gm, (x,)))
    gm.train()
    torch.manual_seed(123)
    assert_close(gm(x), want)


def test_dropout_merge_is_dropconnect_on_lora_A_and_follows_mode():
    p = 0.25
    model = _Up()
    x = torch.randn(2, 4, 5, 5)
    gm = randomize_(lora_fx.transform(model, rank=2, alpha=3, dropout=p))
    (node,) = _dropout_nodes(gm)
    assert node.args[0].op == "get_attr" and node.args[0].target.endswith("lora_A")
    s = lora_fx.sites(gm)[0]
    A, B = s.lora_A.detach(), s.lora_B.detach()
    W = model.m.weight

    def manual(a):
        return torch.func.functional_call(model, {"m.weight": lora_weight(W, a, B, float(s.scaling))}, (x,))

    gm.train()
    torch.manual_seed(5)
    out = gm(x)
    torch.manual_seed(5)
    assert_close(out, manual(F.dropout(A, p, training=True)))
    gm.eval()
    assert_close(gm(x), manual(A))


def test_dropout_never_touches_base_path():
    """With B = 0 the adapter adds nothing, in train mode too: dropout is on the branch only."""
    model = _Lin()
    x = torch.randn(3, 5, 12)
    gm = randomize_(lora_fx.transform(model, rank=2, lowering="factored", dropout=0.9))
    with torch.no_grad():
        lora_fx.sites(gm)[0].lora_B.zero_()
    gm.train()
    assert torch.equal(gm(x), model(x))
