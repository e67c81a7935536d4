"""transform(): targets/exclude globs, alpha/scaling, state_dict contents, pretrained checkpoint
loading, and the input model left untouched (also when transform fails)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from _checks import assert_unchanged, snapshot
from _reference import check_matches_reference, randomize_
from lora_fx.errors import ConfigError, LoraFxError, TargetError, TraceError, UnsupportedSiteError
from _tolerance import assert_close


class Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, 6)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1)
        return a @ self.v(x)


class Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = Attn(d)
        self.up = nn.Linear(6, 12)
        self.norm = nn.LayerNorm(12)

    def forward(self, x):
        return self.norm(self.up(self.attn(x)))[..., :8]


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Embedding(30, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(2))
        self.head = nn.Linear(d, 5)
        self.register_buffer("pos", torch.arange(4).float()[:, None] / 10)
        self.register_buffer("tmp", torch.ones(1), persistent=False)

    def forward(self, idx):
        x = self.emb(idx) + self.pos * self.tmp
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _net():
    torch.manual_seed(0)
    return Net()


IDX = torch.tensor([[1, 5, 7, 29], [0, 3, 3, 2]])


def _names(gm):
    return [s.param for s in lora_fx.sites(gm)]


def test_default_targets_every_weight_matrix():
    gm = lora_fx.transform(_net(), rank=2)
    expected = {"emb.weight", "head.weight"} | {f"layers.{i}.{n}.weight" for i in range(2)
                                                for n in ("attn.q", "attn.k", "attn.v", "up")}
    assert set(_names(gm)) == expected  # no biases, no LayerNorm weights


def test_targets_and_exclude_globs_exclude_wins():
    model = _net()
    gm = lora_fx.transform(model, rank=2, targets=["layers.*.attn.*.weight", "head.weight"],
                           exclude=["layers.1.*", "*.k.weight"])
    assert sorted(_names(gm)) == ["head.weight", "layers.0.attn.q.weight", "layers.0.attn.v.weight"]
    gm = lora_fx.transform(model, rank=2, targets="layers.0.up.weight")  # a single string
    assert _names(gm) == ["layers.0.up.weight"]
    randomize_(gm)
    check_matches_reference(model, gm, (IDX,))


@pytest.mark.parametrize("kw", [{"targets": ["layers.*.mlp.weight"]}, {"exclude": ["nothing.*"]}])
def test_pattern_matching_nothing_lists_candidates(kw):
    model = _net()
    snap = snapshot(model)
    with pytest.raises(TargetError) as ei:
        lora_fx.transform(model, rank=2, **kw)
    msg = str(ei.value)
    assert next(iter(kw.values()))[0] in msg
    assert "layers.0.attn.q.weight" in msg and "head.weight" in msg
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, LoraFxError)
    assert_unchanged(model, snap)


def test_exclude_everything_raises():
    with pytest.raises(TargetError, match="exclude removed every target"):
        lora_fx.transform(_net(), rank=2, targets=["head.weight"], exclude=["head.*"])


def test_explicit_unsupported_target_raises():
    model = _net()
    snap = snapshot(model)
    with pytest.raises(UnsupportedSiteError, match="head.bias"):
        lora_fx.transform(model, rank=2, targets=["head.bias"])
    assert_unchanged(model, snap)


def test_explicit_opaque_target_merges():
    """A ≥2-D parameter read by a non-default op (here ``*``) is adapted only when named."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(3, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x * self.scale)

    torch.manual_seed(0)
    model = M()
    assert _names(lora_fx.transform(model, rank=1)) == ["fc.weight"]
    gm = lora_fx.transform(model, rank=1, targets=["scale"])
    assert _names(gm) == ["scale"] and lora_fx.sites(gm)[0].lowering == "merge"
    randomize_(gm)
    check_matches_reference(model, gm, (torch.randn(2, 3, 4),))


@pytest.mark.parametrize("rank, alpha, expected", [(4, None, 1.0), (4, 8, 2.0), (2, 0.5, 0.25)])
def test_alpha_default_and_scaling(rank, alpha, expected):
    kw = {} if alpha is None else {"alpha": alpha}
    gm = lora_fx.transform(_net(), rank=rank, targets=["head.weight"], **kw)
    s = lora_fx.sites(gm)[0]
    assert s.rank == rank and s.alpha == (rank if alpha is None else alpha)
    assert s.scaling == pytest.approx(expected) and float(s.module.scaling) == pytest.approx(expected)


def test_default_rank_is_16():
    s = lora_fx.sites(lora_fx.transform(nn.Sequential(nn.Linear(32, 20)), targets=["0.weight"]))[0]
    assert s.rank == 16 and s.scaling == 1.0


@pytest.mark.parametrize("kw", [{"rank": 0}, {"rank": 2.5}, {"alpha": -1}, {"dropout": 1.0},
                                {"lowering": "fast"}, {"rank": 2, "bogus": 1}])
def test_invalid_arguments(kw):
    model = _net()
    snap = snapshot(model)
    with pytest.raises(ConfigError):
        lora_fx.transform(model, **kw)
    assert_unchanged(model, snap)


def test_state_dict_has_original_keys_and_values_plus_adapters():
    model = _net()
    sd0 = model.state_dict()
    gm = lora_fx.transform(model, rank=2)
    sd = gm.state_dict()
    for k, v in sd0.items():
        assert k in sd, k
        assert torch.equal(sd[k], v), k
    assert [k for k in sd if k in sd0] == list(sd0)  # same order
    extra = set(sd) - set(sd0)
    assert extra and all(k.endswith((".lora_A", ".lora_B")) and ".lora.default." in k for k in extra)
    assert "layers.0.attn.q.lora.default.weight.lora_A" in extra
    assert len(extra) == 2 * len(lora_fx.sites(gm))
    assert "tmp" not in sd  # persistence kept
    # base parameters are frozen, adapters train
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == extra


def test_pretrained_checkpoint_loads_non_strict():
    model = _net()
    gm = lora_fx.transform(model, rank=2)
    torch.manual_seed(5)
    pretrained = Net()  # other values, same architecture
    res = gm.load_state_dict(pretrained.state_dict(), strict=False)
    assert not res.unexpected_keys
    assert set(res.missing_keys) == {k for k in gm.state_dict() if ".lora." in k}
    assert_close(gm(IDX), pretrained(IDX), ulps=0)  # B = 0
    randomize_(gm)
    check_matches_reference(pretrained, gm, (IDX,))


def test_model_never_mutated_by_transform_training_and_fold():
    model = _net()
    model.layers[1].up.weight.requires_grad_(False)  # user's own flags are kept
    snap = snapshot(model)
    out0 = model(IDX).detach()
    gm = lora_fx.transform(model, rank=2, copy_weights=True)
    randomize_(gm)
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    for _ in range(2):
        gm(IDX).square().mean().backward()
        opt.step()
        opt.zero_grad()
    lora_fx.fold(gm)
    gm.eval()
    assert_unchanged(model, snap)
    assert not any(isinstance(m, lora_fx.LoraAdapter) for m in model.modules())
    assert torch.equal(model(IDX), out0)


def test_copy_weights_false_shares_storage_without_mutation():
    model = _net()
    snap = snapshot(model)
    gm = lora_fx.transform(model, rank=2, copy_weights=False)
    assert gm.head.weight.data_ptr() == model.head.weight.data_ptr()
    assert not gm.head.weight.requires_grad and model.head.weight.requires_grad
    assert_unchanged(model, snap)


def test_model_unchanged_when_transform_fails_late():
    """A failure after tracing (an owner already has a ``lora`` attribute) leaves the model alone."""
    model = _net()
    model.head.lora = "mine"
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="head"):
        lora_fx.transform(model, rank=2)
    assert_unchanged(model, snap)
    assert model.head.lora == "mine"


def test_transform_twice_raises_and_functional_sites_stay_unique():
    gm = lora_fx.transform(_net(), rank=2)
    with pytest.raises(lora_fx.AlreadyAdaptedError):
        lora_fx.transform(gm, rank=2)


def test_untraceable_model_error_is_typed():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return F.relu(x)

    model = Bad()
    snap = snapshot(model)
    with pytest.raises(TraceError):
        lora_fx.transform(model, rank=2, frontend="fx")
    assert_unchanged(model, snap)
    kept = lora_fx.transform(model, rank=2)  # "auto": the branch stays Python, fc is a region
    assert type(kept) is Bad and [s.param for s in lora_fx.sites(kept)] == ["fc.weight"]
    assert_unchanged(model, snap)


@pytest.mark.parametrize("lowering", ["merge", "factored"])
def test_dropout_runs_in_train_and_is_identity_in_eval(lowering):
    """LoRA dropout on every site kind of Net (embedding indices get none at factored sites)."""
    model = _net()
    gm = randomize_(lora_fx.transform(model, rank=2, dropout=0.5, lowering=lowering))
    gm.train()
    y = gm(IDX)
    assert y.shape == (2, 4, 5) and torch.isfinite(y).all()
    y.sum().backward()
    gm.eval()
    check_matches_reference(model, gm, (IDX,))
