"""Per-site lowering (factored vs merge) and LoRA dropout, against an independent functional
reference ``functional_call(model, {W: W + s·(B@A).reshape(W.shape)})``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import ops

from _lowering_zoo import ZOO, Wrap, randomise_adapters_, reference_call

KINDS = sorted(ZOO)


def _build(kind, dtype, lowering, **kw):
    make_model, make_input, targets, _ = ZOO[kind]
    torch.manual_seed(0)  # same model and input for every lowering
    model = make_model().to(dtype)
    x = make_input()
    if x.is_floating_point():
        x = x.to(dtype)
    gm = lora_fx.transform(model, rank=2, alpha=3, targets=targets, lowering=lowering, **kw)
    randomise_adapters_(gm)
    return model, gm, x


def _loss_weights(out):
    g = torch.Generator().manual_seed(7)
    return torch.randn(out.shape, generator=g).to(out.dtype)


def _run(fn, x, out_w=None):
    x = x.detach().clone().requires_grad_(x.is_floating_point())
    out = fn(x)
    w = _loss_weights(out) if out_w is None else out_w
    (out.float() * w.float()).sum().backward()
    return out, x.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lowering", ["auto", "factored", "merge"])
def test_lowering_matches_functional_reference_fp32(kind, lowering):
    model, gm, x = _build(kind, torch.float32, lowering)
    gm.graph.lint()
    out, gx = _run(gm, x)
    ref_leaves = {}

    def ref_fn(xx):
        o, leaves = reference_call(model, gm, xx)
        ref_leaves.update(leaves)
        return o

    ref, rgx = _run(ref_fn, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if gx is not None:
        torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
    for s in lora_fx.sites(gm):
        A, B = ref_leaves[s.param]
        torch.testing.assert_close(s.lora_A.grad, A.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(s.lora_B.grad, B.grad, rtol=1e-4, atol=1e-5)
    # base weights stay frozen and receive no gradient
    assert all(p.grad is None for n, p in gm.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("kind", KINDS)
def test_lowering_choice_per_site(kind):
    _, _, targets, expected = ZOO[kind]
    for lowering, want in (("auto", expected), ("merge", ["merge"] * len(expected)),
                           ("factored", expected)):  # factored where exact, merge elsewhere
        _, gm, _ = _build(kind, torch.float32, lowering)
        got = {s.param: s.lowering for s in lora_fx.sites(gm)}
        assert [got[t] for t in targets] == want, (lowering, got)
        calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        n_delta = sum(t in ops.DELTA_OPS for t in calls)
        n_merge = sum(t is ops.merge for t in calls)
        assert n_delta == want.count("factored") and n_merge == want.count("merge")


def test_auto_merges_conv_when_rank_is_not_small():
    model = Wrap(lambda s, x: s.m(x), m=nn.Conv2d(3, 4, 1))  # fan_in 3: rank 2 is not cheaper factored
    assert lora_fx.sites(lora_fx.transform(model, rank=2))[0].lowering == "merge"
    assert lora_fx.sites(lora_fx.transform(model, rank=2, lowering="factored"))[0].lowering == "factored"


@pytest.mark.parametrize("kind", ["linear", "embedding_square", "conv2d", "conv_transpose2d", "matmul_left",
                                  "addmm", "mha", "f_conv2d"])
def test_lowerings_agree_in_bf16(kind):
    """bf16 base, fp32 adapters: both lowerings return bf16 and match the reference computed in
    float32 from the same bf16 weights and inputs, to bf16 rounding."""
    outs = {}
    for lowering in ("factored", "merge"):
        model, gm, x = _build(kind, torch.bfloat16, lowering)
        assert all(s.lora_A.dtype == torch.float32 for s in lora_fx.sites(gm))
        out, _ = _run(gm, x)
        assert out.dtype == torch.bfloat16
        model32 = Wrap(model.fn, **{k: v for k, v in model.named_children()},
                       **{k: v for k, v in model._parameters.items()})
        model32 = model32.float()
        ref, leaves = reference_call(model32, gm, x.float() if x.is_floating_point() else x)
        tol = 2e-2 * ref.abs().max().item() + 1e-2
        assert (out.float() - ref).abs().max().item() <= tol, lowering
        (ref * _loss_weights(ref).float()).sum().backward()
        for s in lora_fx.sites(gm):
            A, B = leaves[s.param]
            for got, want in ((s.lora_A.grad, A.grad), (s.lora_B.grad, B.grad)):
                assert got.dtype == torch.float32
                assert (got - want).abs().max().item() <= 3e-2 * want.abs().max().item() + 1e-2
        outs[lowering] = out.float()
    assert (outs["factored"] - outs["merge"]).abs().max().item() <= 2e-2 * outs["merge"].abs().max().item() + 1e-2


# --------------------------------------------------------------------------------------------
# dropout


def _dropout_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_module" and n.target.endswith(".dropout")]


@pytest.mark.parametrize("lowering", ["factored", "merge"])
def test_dropout_zero_inserts_nothing(lowering):
    model, gm, _ = _build("linear", torch.float32, lowering, dropout=0.0)
    assert not _dropout_nodes(gm)
    assert not any(isinstance(m, nn.Dropout) for m in gm.modules())


def test_dropout_factored_is_on_branch_input_and_follows_mode():
    p = 0.5
    model, gm, x = _build("linear", torch.float32, "factored", dropout=p)
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
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, manual(x))  # dropout acted
    gm.eval()
    torch.testing.assert_close(gm(x), manual(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gm(x), reference_call(model, gm, x)[0], rtol=1e-5, atol=1e-5)
    gm.train()
    torch.manual_seed(123)
    torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)


def test_dropout_merge_is_dropconnect_on_lora_A_and_follows_mode():
    p = 0.25
    model, gm, x = _build("conv_transpose2d", torch.float32, "auto", dropout=p)
    (node,) = _dropout_nodes(gm)
    assert node.args[0].op == "get_attr" and node.args[0].target.endswith("lora_A")
    s = lora_fx.sites(gm)[0]
    A, B = s.lora_A.detach(), s.lora_B.detach()
    W = model.m.weight

    def manual(a):
        Wp = W + float(s.scaling) * (B @ a).reshape(W.shape)
        return torch.func.functional_call(model, {"m.weight": Wp}, (x,))

    gm.train()
    torch.manual_seed(5)
    out = gm(x)
    torch.manual_seed(5)
    torch.testing.assert_close(out, manual(F.dropout(A, p, training=True)), rtol=1e-5, atol=1e-5)
    gm.eval()
    torch.testing.assert_close(gm(x), manual(A), rtol=1e-5, atol=1e-5)


def test_dropout_never_touches_base_path():
    """With B = 0 the adapter adds nothing, in train mode too: dropout is on the branch only."""
    model, gm, x = _build("linear", torch.float32, "factored", dropout=0.9)
    with torch.no_grad():
        lora_fx.sites(gm)[0].lora_B.zero_()
    gm.train()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class _ModeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1 = nn.Embedding(100, 32)
        self.e2 = nn.Embedding(32, 32)
        self.fc = nn.Linear(64, 32)

    def forward(self, idx):
        return self.fc(torch.cat([self.e1(idx), self.e2(idx % 32)], dim=-1))


@pytest.mark.parametrize("lowering", ["factored", "merge"])
def test_case1_mode_switches_change_nothing(lowering):
    model = _ModeModel()
    gm = lora_fx.transform(model, rank=4, alpha=8, lowering=lowering, dropout=0.0)
    randomise_adapters_(gm)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    idx = torch.randint(0, 100, (3, 6))
    gm.train()
    a = gm(idx)
    gm.eval()
    b = gm(idx)
    gm.train()
    c = gm(idx)
    assert torch.equal(a, b) and torch.equal(b, c)
    torch.testing.assert_close(a, reference_call(model, gm, idx)[0], rtol=1e-5, atol=1e-5)
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
