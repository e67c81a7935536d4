"""Regression tests for faults found by the adversarial and new-user reviews."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx.errors import (AdapterMismatchError, ConfigError, LoraFxWarning, TargetError, TraceError,
                            UnsupportedSiteError)
from lora_fx.io import load_lora_state, save_lora_state


def _randomize(gm):
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_A.normal_()
            s.lora_B.normal_()
    return gm


def _reference(model, gm, *args):
    params = dict(model.named_parameters())
    for s in lora_fx.sites(gm):
        name = next(a for a in s.aliases if a in params)
        params[name] = params[name] + s.scaling * (s.lora_B @ s.lora_A).reshape(s.shape)
    return torch.func.functional_call(model, params, args)


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
    _randomize(gm)
    x = torch.randn(8, 4)
    assert torch.equal(gm(x), gm(x))


@pytest.mark.parametrize("lowering", ["auto", "merge"])
def test_forward_hooks_see_the_adapted_output(lowering):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    model.register_forward_hook(lambda m, i, o: o + 1)
    gm = lora_fx.transform(model, rank=2, lowering=lowering)
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    _randomize(gm)
    torch.testing.assert_close(gm(x), _reference(model, gm, x))


def test_fold_refuses_to_untie_a_module_shared_by_blocks():
    class Blk(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            sh = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([Blk(sh), Blk(sh)])

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x))

    gm = _randomize(lora_fx.transform(M(), rank=2, targets=["blocks.0.shared.weight"]))
    with pytest.raises(UnsupportedSiteError, match="blocks.1.shared.weight"):
        lora_fx.fold(gm)
    both = _randomize(lora_fx.transform(M(), rank=2))
    x = torch.randn(2, 4)
    torch.testing.assert_close(lora_fx.fold(both)(x), both(x))


def test_bad_values_are_typed_errors():
    model = nn.Linear(3, 3)
    with pytest.raises(ConfigError, match="alpha"):
        lora_fx.transform(model, rank=2, alpha=math.inf)
    for name in ("", "a.b", 3):
        with pytest.raises(ConfigError, match="adapter name"):
            lora_fx.transform(model, rank=2, adapter_name=name)
    with pytest.raises(TargetError, match="targets is empty"):
        lora_fx.transform(model, rank=2, targets=[])


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


def test_adapter_file_never_overwrites_base_weights_nor_loads_nan(tmp_path):
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(3, 3))
    gm = lora_fx.transform(model, rank=2)
    good = save_lora_state(_randomize(gm), tmp_path / "good.safetensors")
    sd = dict(lora_fx.lora_state_dict(gm))
    save_file({**{k: v.clone() for k, v in sd.items()}, "0.weight": torch.zeros(3, 3)}, tmp_path / "base.safetensors")
    nan = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    save_file(nan, tmp_path / "nan.safetensors")
    fresh = lora_fx.transform(model, rank=2)
    w = fresh.get_parameter("0.weight").clone()
    for bad, msg in (("base.safetensors", "base weight"), ("nan.safetensors", "inf/nan")):
        with pytest.raises(AdapterMismatchError, match=msg):
            load_lora_state(fresh, tmp_path / bad)
    assert torch.equal(fresh.get_parameter("0.weight"), w)
    load_lora_state(fresh, good)


def test_root_optional_argument_traced_as_tensor_warns():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, mask=None):
            y = self.fc(x)
            return y * mask if mask is not None else y

    with pytest.warns(LoraFxWarning, match="concrete_args"):
        lora_fx.transform(M(), rank=2, frontend="fx")
    gm = lora_fx.transform(M(), rank=2, frontend="fx", concrete_args={"mask": None})
    assert gm(torch.randn(2, 3)).shape == (2, 3)


def test_peft_files_from_export_captured_model(tmp_path):
    peft = pytest.importorskip("peft")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))

    model, x = M().eval(), torch.randn(3, 8)
    gm = _randomize(lora_fx.transform(model, rank=2, frontend="export", example_inputs=(x,)))
    lora_fx.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    torch.testing.assert_close(pm(x), gm(x))
    back = lora_fx.load_adapter(model, tmp_path, frontend="export", example_inputs=(x,))
    torch.testing.assert_close(back(x), gm(x))
