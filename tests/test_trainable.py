"""``trainable=``: base modules trained in full next to the adapter (PEFT's ``modules_to_save``):
selection by module or parameter patterns, no adapter on them, never the user's model (also with
``copy_weights=False``), trainability follows the adapter, saved with it, kept by ``fold``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.io import load_lora_state, save_lora_state
from _checks import assert_unchanged, snapshot


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.norm(self.body(x)))


def _trainable(gm):
    return sorted(n for n, p in gm.named_parameters() if p.requires_grad and "lora_" not in n)


@pytest.mark.parametrize("patterns, want", [
    (["head"], ["head.bias", "head.weight"]),
    (["head.weight", "norm"], ["head.weight", "norm.bias", "norm.weight"]),
    (["*.bias"], ["body.0.bias", "body.2.bias", "head.bias", "norm.bias"]),
])
def test_selection_and_no_adapter_on_them(patterns, want):
    gm = lora_fx.transform(Net(), rank=2, trainable=patterns)
    assert _trainable(gm) == want
    adapted = {s.param for s in lora_fx.sites(gm)}
    assert not adapted & set(want) and adapted
    assert sorted(k for k in lora_fx.lora_state_dict(gm) if "lora_" not in k) == want
    ids = {id(p) for p in lora_fx.adapter_parameters(gm)}
    assert {id(gm.get_parameter(n)) for n in want} <= ids


def test_refusals_name_the_pattern():
    with pytest.raises(lora_fx.TargetError, match="trainable pattern 'nope' matches no module"):
        lora_fx.transform(Net(), rank=2, trainable=["nope"])
    with pytest.raises(lora_fx.ConfigError, match=r"\['head.weight'\] are both LoRA targets and trainable"):
        lora_fx.transform(Net(), rank=2, targets=["head.weight", "body.0.weight"], trainable=["head"])


@pytest.mark.parametrize("copy_weights", [True, False])
def test_training_never_changes_the_users_model(tmp_path, copy_weights):
    torch.manual_seed(0)
    model = Net()
    snap = snapshot(model)
    gm = lora_fx.transform(model, rank=2, trainable=["head"], copy_weights=copy_weights)
    opt = torch.optim.SGD(lora_fx.adapter_parameters(gm), lr=0.5)
    x = torch.randn(5, 6)
    for _ in range(3):
        gm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert_unchanged(model, snap)
    assert not torch.equal(gm.get_parameter("head.weight"), model.head.weight)
    # saved with the adapter, restored by the loader, kept by fold (strict-loads into the class)
    fresh = lora_fx.transform(model, rank=2, trainable=["head"])
    load_lora_state(fresh, save_lora_state(gm, tmp_path / "a.safetensors"))
    assert torch.equal(fresh(x), gm(x))
    plain = Net()
    plain.load_state_dict(lora_fx.fold(gm).state_dict(), strict=True)
    torch.testing.assert_close(plain(x), gm(x))


def test_trainability_follows_the_adapter():
    gm = lora_fx.transform(Net(), rank=2, trainable=["head"])
    lora_fx.add_adapter(gm, "b", rank=2, targets=["body.0.weight"], trainable=["norm"])
    assert _trainable(gm) == ["head.bias", "head.weight"]  # "b" was added inactive
    lora_fx.set_active_adapters(gm, "b")
    lora_fx.mark_only_lora_as_trainable(gm)
    assert _trainable(gm) == ["norm.bias", "norm.weight"]
    lora_fx.set_active_adapters(gm, ["default", "b"])
    lora_fx.mark_only_lora_as_trainable(gm)
    assert _trainable(gm) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    lora_fx.delete_adapter(gm, "b")
    lora_fx.mark_only_lora_as_trainable(gm)
    assert _trainable(gm) == ["head.bias", "head.weight"]


def test_peft_modules_to_save_patterns_are_checked(tmp_path):
    gm = lora_fx.transform(Net(), rank=2, targets=["body.*.weight"])
    with pytest.raises(lora_fx.UnsupportedSiteError, match="modules_to_save pattern 'nope' matches no module"):
        lora_fx.save_adapter(gm, tmp_path / "a", modules_to_save=["nope"])

    class Two(nn.Module):  # "head" would also match "aux_head" under PEFT's suffix rule
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head, self.aux_head = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc(x)
            return self.head(h) + self.aux_head(h)

    gm = lora_fx.transform(Two(), rank=2, targets=["fc.weight"], trainable=["head"])
    with pytest.raises(lora_fx.UnsupportedSiteError, match=r"'head' also matches \['aux_head'\] under PEFT's rule"):
        lora_fx.save_adapter(gm, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
