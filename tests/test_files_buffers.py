"""Buffers that training changed are saved with the adapter, or a warning says so.

BatchNorm1d / BatchNorm2d running statistics and a custom module's running average, changed by a
few training steps: lora_fx's own files (and gathered files) carry them, so the reloaded model
computes in eval mode what the trained one did; ``buffers=False`` leaves them out with a warning
naming them; a PEFT file carries them only as ``modules_to_save`` (real PEFT restores them), and
without that a warning names them and the fix."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.errors import LoraFxWarning
from lora_fx.io import load_lora_state, save_lora_state
from lora_fx.buffers import changed_buffers

peft = pytest.importorskip("peft")


class RunningMean(nn.Module):
    """A custom module with a running buffer: subtracts a running mean of its input (EMA in train mode)."""

    def __init__(self, n: int, momentum: float = 0.3):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("avg", torch.zeros(n))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.avg.lerp_(x.detach().flatten(0, -2).mean(0), self.momentum)
                self.steps += 1
        return x - self.avg


class Net1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.run = RunningMean(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.run(torch.tanh(self.bn(self.fc(x)))))


class Net2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


CASES = {
    "bn1d+custom": (Net1d, (16, 6), dict(leaf_modules=["run"]),
                    ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked", "run.avg", "run.steps"]),
    "bn2d": (Net2d, (8, 2, 5, 5), dict(), ["bn.running_mean", "bn.running_var", "bn.num_batches_tracked"]),
}


def _trained(case):
    cls, shape, kw, _ = CASES[case]
    torch.manual_seed(0)
    base = cls().eval()
    gm = lora_fx.transform(base, rank=2, **kw)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    gm.train()
    for _ in range(3):
        x = torch.randn(shape, generator=g) * 2 + 1
        gm(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return base, gm.eval(), kw, torch.randn(shape, generator=g)


@pytest.mark.parametrize("case", list(CASES))
def test_changed_buffers_are_found(case):
    base, gm, _, _ = _trained(case)
    assert changed_buffers(gm) == CASES[case][3]
    assert changed_buffers(lora_fx.transform(base, rank=2, **CASES[case][2])) == []


@pytest.mark.parametrize("saver", ["save_lora_state", "save_gathered_lora_state"])
@pytest.mark.parametrize("case", list(CASES))
def test_own_files_carry_them(tmp_path, case, saver):
    base, gm, kw, x = _trained(case)
    save = save_lora_state if saver == "save_lora_state" else lora_fx.distributed.save_gathered_lora_state
    path = save(gm, tmp_path / "a.safetensors")
    fresh = lora_fx.transform(base, rank=2, **kw).eval()
    load_lora_state(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), gm(x))
    for k in CASES[case][3]:
        assert torch.equal(fresh.state_dict()[k], gm.state_dict()[k]), k


@pytest.mark.parametrize("case", list(CASES))
def test_leaving_them_out_warns_and_shows_why_it_matters(tmp_path, case):
    base, gm, kw, x = _trained(case)
    with pytest.warns(LoraFxWarning, match="buffers=False leaves out") as rec:
        path = save_lora_state(gm, tmp_path / "a.safetensors", buffers=False)
    assert all(k in str(rec[0].message) for k in CASES[case][3][:3])
    fresh = lora_fx.transform(base, rank=2, **kw).eval()
    load_lora_state(fresh, path)
    with torch.no_grad():
        assert not torch.allclose(fresh(x), gm(x))  # the statistics are the model's outputs in eval mode


@pytest.mark.parametrize("case", list(CASES))
def test_peft_files_carry_them_as_modules_to_save_or_warn(tmp_path, case):
    base, gm, kw, x = _trained(case)
    changed = CASES[case][3]
    with pytest.warns(LoraFxWarning, match=r"not in the PEFT file.*modules_to_save=\[") as rec:
        lora_fx.save_adapter(gm, tmp_path / "bare")
    assert all(k in str(rec[0].message) for k in changed[:3])
    owners = sorted({k.rpartition(".")[0] for k in changed})
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraFxWarning)
        lora_fx.save_adapter(gm, tmp_path / "full", modules_to_save=owners)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "full").eval()
    with torch.no_grad():
        torch.testing.assert_close(pm(x), gm(x))
        back = lora_fx.load_adapter(base, tmp_path / "full", **kw).eval()
        torch.testing.assert_close(back(x), gm(x))
