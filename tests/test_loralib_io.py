"""A model written against loralib runs unchanged with ``import lora_fx.nn as lora``, loads its
loralib checkpoints, and loralib / LoRA-Torch checkpoints convert both ways to and from models
adapted by ``lora_fx.transform`` (outputs and gradients to 1e-5)."""

import types

import loralib
import pytest
import torch
from torch import nn

import lora_fx
import lora_fx.nn as lnn
from lora_fx.errors import AdapterMismatchError
from _reference import randomize_
from _tolerance import assert_close

# loralib's conv update (r=2, k=3) is rank 18 in lora_fx's layout: full rank for these tiny layers
pytestmark = pytest.mark.filterwarnings("ignore::lora_fx.LoraFxWarning")

# A plain-torch stand-in with loralib's constructor signatures (r=0 everywhere): the base model.
PLAIN = types.SimpleNamespace(
    Linear=lambda i, o, r=0, lora_alpha=1, **kw: nn.Linear(i, o, **kw),
    MergedLinear=lambda i, o, r=0, lora_alpha=1, enable_lora=None, **kw: nn.Linear(i, o, **kw),
    Embedding=lambda n, d, r=0, lora_alpha=1, **kw: nn.Embedding(n, d, **kw),
    Conv2d=lambda i, o, k, r=0, lora_alpha=1, **kw: nn.Conv2d(i, o, k, **kw),
)


def build(lora):
    """User code written against loralib: only the ``lora`` namespace changes."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = lora.Embedding(20, 8, r=4, lora_alpha=8)
            self.qkv = lora.MergedLinear(8, 24, r=2, lora_alpha=4, enable_lora=[True, False, True])
            self.fc = lora.Linear(8, 16, r=16, lora_alpha=32)
            self.conv = lora.Conv2d(2, 3, 3, r=2, lora_alpha=4, padding=1)
            self.head = lora.Linear(16, 5, r=0)

        def forward(self, idx, img):
            h = self.emb(idx)
            q, k, v = self.qkv(h).chunk(3, -1)
            a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v
            z = self.fc(a).mean(1) + self.conv(img).flatten(1)[:, :16]
            return self.head(torch.relu(z))

    return Net()


ALPHAS = {"emb": 8, "qkv": 4, "fc": 32, "conv": 4}
RANKS = {"emb.weight": 4, "qkv.weight": 4, "fc.weight": 16, "conv.weight": 18}  # lora_fx layout ranks


def _inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 20, (3, 6), generator=g), torch.randn(3, 2, 4, 4, generator=g)


def _trained_loralib():
    torch.manual_seed(0)
    ref = build(loralib)
    loralib.mark_only_lora_as_trainable(ref, bias="lora_only")
    opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05)
    idx, img = _inputs()
    for _ in range(3):  # non-zero A and B, as after real training
        opt.zero_grad()
        ref(idx, img).pow(2).mean().backward()
        opt.step()
    return ref


def _grads(model, idx, img):
    model.zero_grad(set_to_none=True)
    img = img.clone().requires_grad_()
    out = model(idx, img)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, img.grad


def test_loralib_model_runs_unchanged_with_lora_fx_nn():
    ref = _trained_loralib()
    pretrained = {k: v for k, v in ref.state_dict().items() if "lora_" not in k}
    checkpoint = loralib.lora_state_dict(ref, bias="lora_only")
    assert any("bias" in k for k in checkpoint)

    torch.manual_seed(123)
    ours = build(lnn)  # the same code, import swapped
    lnn.mark_only_lora_as_trainable(ours, bias="lora_only")
    r1 = ours.load_state_dict(pretrained, strict=False)
    r2 = ours.load_state_dict(checkpoint, strict=False)
    assert not r1.unexpected_keys and not r2.unexpected_keys
    assert set(r1.missing_keys) & set(r2.missing_keys) == set()

    idx, img = _inputs()
    out_r, g_r, gi_r = _grads(ref, idx, img)
    out_o, g_o, gi_o = _grads(ours, idx, img)
    assert_close(out_o, out_r)
    assert_close(gi_o, gi_r)
    g_r = {k.replace("conv.conv.", "conv."): v for k, v in g_r.items()}
    # one documented difference: loralib's ConvLoRA keeps its bias in an inner ``conv`` module, so
    # its "lora_only" rule (``m.bias`` of LoRA layers) never reaches it; here Conv2d *is* the conv.
    assert set(g_o) == set(g_r) | {"conv.bias"}
    for n in g_r:
        assert_close(g_o[n], g_r[n], msg=n)
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert_close(ours(idx, img), ref(idx, img))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_freezing_and_state_dict_semantics_match_loralib(bias):
    torch.manual_seed(0)
    ref, ours = build(loralib), build(lnn)
    loralib.mark_only_lora_as_trainable(ref, bias=bias)
    lnn.mark_only_lora_as_trainable(ours, bias=bias)
    fix = lambda names: {n.replace("conv.conv.", "conv.") for n in names} | (
        {"conv.bias"} if bias == "lora_only" else set())  # see test_loralib_model_runs_unchanged...
    assert fix(n for n, p in ref.named_parameters() if p.requires_grad) == \
        {n for n, p in ours.named_parameters() if p.requires_grad}
    assert fix(loralib.lora_state_dict(ref, bias=bias)) == set(lnn.lora_state_dict(ours, bias=bias))
    # r=0 LoRA layer: loralib trains its bias under "lora_only" but does not save it
    assert ours.head.bias.requires_grad == (bias != "none")


def _transformed_base(ref):
    base = build(PLAIN)
    base.load_state_dict({k.replace("conv.conv.", "conv."): v for k, v in ref.state_dict().items()
                          if "lora_" not in k})
    return lora_fx.transform(base, rank=4, alpha=8, targets=list(RANKS), rank_pattern=RANKS)


def test_loralib_checkpoint_loads_into_transformed_model():
    ref = _trained_loralib()
    gm = _transformed_base(ref)
    ckpt = loralib.lora_state_dict(ref)
    lora_fx.load_loralib_state_dict(gm, ckpt, lora_alpha=ALPHAS, enable_lora={"qkv": [True, False, True]})
    idx, img = _inputs()
    out_r, _, gi_r = _grads(ref, idx, img)
    out_g, _, gi_g = _grads(gm, idx, img)
    assert_close(out_g, out_r)
    assert_close(gi_g, gi_r)


def test_bad_loralib_checkpoints_raise_and_leave_model_unchanged():
    ref = _trained_loralib()
    ckpt = loralib.lora_state_dict(ref)
    gm = _transformed_base(ref)
    small = lora_fx.transform(build(PLAIN), rank=4, targets=list(RANKS), rank_pattern={"fc.weight": 16})
    before = {k: v.clone() for k, v in small.state_dict().items()}
    with pytest.raises(AdapterMismatchError) as e:
        lora_fx.load_loralib_state_dict(small, ckpt, lora_alpha=ALPHAS, enable_lora={"qkv": [True, False, True]})
    assert "'conv.lora_A'" in str(e.value) and "rank_pattern={'conv.weight': 18}" in str(e.value)
    assert all(torch.equal(v, small.state_dict()[k]) for k, v in before.items())
    with pytest.raises(AdapterMismatchError, match=r"'qkv.lora_A'.*enable_lora"):
        lora_fx.load_loralib_state_dict(gm, ckpt, lora_alpha=ALPHAS)
    with pytest.raises(AdapterMismatchError, match="'nope.lora_A'"):
        lora_fx.load_loralib_state_dict(gm, dict(ckpt, **{"nope.lora_A": torch.zeros(1, 2), "nope.lora_B": torch.zeros(2, 1)}),
                                        lora_alpha=ALPHAS, enable_lora={"qkv": [True, False, True]})
    with pytest.raises(AdapterMismatchError, match="no checkpoint key.*fc.weight"):
        lora_fx.load_loralib_state_dict(gm, {k: v for k, v in ckpt.items() if not k.startswith("fc.")},
                                        lora_alpha=ALPHAS, enable_lora={"qkv": [True, False, True]})


def _random_adapters(gm, seed=5):
    return randomize_(gm, seed=seed, scale=0.3)


def test_transformed_adapters_export_to_loralib():
    torch.manual_seed(0)
    base = build(PLAIN)
    ranks = {"emb.weight": 4, "qkv.weight": 2, "fc.weight": 16, "conv.weight": 2}
    gm = _random_adapters(lora_fx.transform(base, rank=2, alpha=3, targets=list(ranks), rank_pattern=ranks,
                                            use_rslora=True))
    qkv = next(s for s in lora_fx.sites(gm) if s.param == "qkv.weight")
    with torch.no_grad():
        qkv.lora_B[8:16] = 0  # the k block is not adapted in the loralib model
    sd = lora_fx.loralib_state_dict(gm, lora_alpha=ALPHAS, enable_lora={"qkv": [True, False, True]})
    idx, img = _inputs()
    out_g, _, gi_g = _grads(gm, idx, img)
    pretrained = base.state_dict()
    for lib in (loralib, lnn):
        model = build(lib)
        model.load_state_dict({("conv.conv." + k[5:] if lib is loralib and k.startswith("conv.") else k): v
                               for k, v in pretrained.items()}, strict=False)
        res = model.load_state_dict(sd, strict=False)
        assert not res.unexpected_keys
        out, _, gi = _grads(model, idx, img)
        assert_close(out, out_g)
        assert_close(gi, gi_g)
    # round trip back into a fresh transform
    gm2 = lora_fx.transform(build(PLAIN), rank=4, alpha=8, targets=list(RANKS), rank_pattern=RANKS)
    gm2.load_state_dict(pretrained, strict=False)
    lora_fx.load_loralib_state_dict(gm2, sd, lora_alpha=ALPHAS, enable_lora={"qkv": [True, False, True]})
    assert_close(gm2(idx, img), out_g)
    with torch.no_grad():
        qkv.lora_B[8:16] = 1.0
    with pytest.raises(AdapterMismatchError, match="qkv.weight.*disabled"):
        lora_fx.loralib_state_dict(gm, lora_alpha=ALPHAS, enable_lora={"qkv": [True, False, True]})


class _AttnNet(nn.Module):
    def __init__(self, lib=None):
        super().__init__()
        if lib is None:
            self.emb, self.attn, self.fc = nn.Embedding(12, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)
        else:
            self.emb = lib.Embedding(12, 8, r=2, lora_alpha=2)
            self.attn = lib.MultiheadAttention(8, 2, enable_lora=["q", "k", "v", "o"], r=2, lora_alpha=2, batch_first=True)
            self.fc = lib.Linear(8, 3, r=2, lora_alpha=2)

    def forward(self, idx):
        h = self.emb(idx)
        return self.fc(self.attn(h, h, h, need_weights=False)[0])


def test_loratorch_style_export_and_import_with_attention():
    torch.manual_seed(0)
    base = _AttnNet()
    with pytest.raises(AdapterMismatchError, match="fused"):
        lora_fx.loralib_state_dict(lora_fx.transform(base, rank=2), style="loratorch")
    gm = _random_adapters(lora_fx.transform(base, rank=2, alpha=5, fused={"*.in_proj_weight": None}))
    assert {s.param for s in lora_fx.sites(gm)} == {"emb.weight", "attn.in_proj_weight", "attn.out_proj.weight", "fc.weight"}
    sd = lora_fx.loralib_state_dict(gm, style="loratorch", lora_alpha=2)
    assert {"emb.w_lora_A", "attn.qkv_lora_A", "attn.qkv_lora_B", "attn.o_lora_A", "fc.w_lora_B"} <= set(sd)
    assert sd["attn.qkv_lora_B"].shape == (24, 2) and sd["emb.w_lora_A"].shape == (2, 8)
    ours = _AttnNet(lnn)
    ours.load_state_dict(base.state_dict(), strict=False)
    assert not ours.load_state_dict(sd, strict=False).unexpected_keys
    idx = torch.randint(0, 12, (2, 5))
    assert_close(ours(idx), gm(idx))
    gm2 = lora_fx.transform(base, rank=2, alpha=1, fused={"*.in_proj_weight": None})
    lora_fx.load_loralib_state_dict(gm2, sd, lora_alpha=2)
    assert_close(gm2(idx), gm(idx))
    with pytest.raises(AdapterMismatchError, match="style='loratorch'"):
        lora_fx.loralib_state_dict(gm)


def test_fan_in_fan_out_and_square_embedding_layouts():
    torch.manual_seed(0)
    ref = nn.Module()
    ref.e = loralib.Embedding(6, 6, r=2, lora_alpha=2)
    ref.f = loralib.Linear(5, 7, r=3, lora_alpha=3, fan_in_fan_out=True)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.normal_()
    base = nn.Module()
    base.e, base.f = nn.Embedding(6, 6), nn.Linear(5, 7)
    base.e.weight.data.copy_(ref.e.weight)
    base.f.weight.data.copy_(ref.f.weight.t())
    base.f.bias.data.copy_(ref.f.bias)

    class Run(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, i, x):
            return self.m.f(x) + self.m.e(i).sum(-1, keepdim=True)

    gm = lora_fx.transform(Run(base), rank=3, alpha=1)
    lora_fx.load_loralib_state_dict(gm, {"m." + k: v for k, v in loralib.lora_state_dict(ref).items()},
                                    lora_alpha={"m.e": 2, "m.f": 3},
                                    strict=True)
    i, x = torch.tensor([0, 5, 3]), torch.randn(3, 5)
    # the Linear's factors were transposed by shape: loralib's fan_in_fan_out layer stores W as (in, out)
    assert_close(gm(i, x), Run(ref)(i, x))


def test_docs_migration_example_runs(tmp_path, monkeypatch):
    import os
    import re

    page = open(os.path.join(os.path.dirname(__file__), "..", "docs", "files.md")).read()
    block = re.search(r"<!-- migration-example -->\n```python\n(.*?)```", page, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/files.md", "exec"), {})
    assert sorted(torch.load(tmp_path / "ckpt_lora.pt")) == ["fc.lora_A", "fc.lora_B"]
