"""Saved files always load after any hot-swap, in lora_fx and in real PEFT, to the same outputs.

After each swap (``reserve_rank_``, a lower-rank ``load_adapter_values_`` with another alpha,
``set_scale_`` up, down and negative, ``set_adapter_weights``, disabling, DoRA, fused blocks, and
non-zero padding written by hand): lora_fx's own file loads into a fresh transform and computes
what the swapped model computes (exactly, and with its rank / alpha / mixing weight restored); the
PEFT file loads in ``peft.PeftModel.from_pretrained`` and in :func:`lora_fx.load_adapter` with the
same outputs (a PEFT file holds the adapter active: the disabled case compares with it enabled).
Outputs are compared with the independent functional reference too."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.io import load_lora_state, save_lora_state
from _reference import randomize_, reference_call
from _tolerance import assert_close, assert_not_close

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore:rank .* exceeds min:lora_fx.errors.LoraFxWarning")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.qkv = nn.Linear(8, 12)
        self.conv = nn.Conv1d(12, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, i):
        h = torch.tanh(self.qkv(self.emb(i)))
        return self.fc(torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2))


def _base():
    torch.manual_seed(0)
    return Net().eval()


X = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))
FUSED = {"qkv.weight": {"blocks": {"q": 4, "k": 4, "v": 4}, "enable": ("q", "v")}}


def _lower_rank(gm):
    lora_fx.reserve_rank_(gm, 6)
    sd = {k: (v[:2] if k.endswith("lora_A") else v[:, :2] if k.endswith("lora_B") else v)
          for k, v in lora_fx.lora_state_dict(gm).items()}
    return lora_fx.load_adapter_values_(gm, sd, alpha=5.0)


def _nonzero_padding(gm):
    lora_fx.reserve_rank_(gm, 5)
    with torch.no_grad():  # padding written by hand: the delta then has rank 5 at scaling alpha / 3
        for s in lora_fx.sites(gm):
            s.lora_A[3:].normal_(std=0.2)
            s.lora_B[:, 3:].normal_(std=0.2)
    return gm


SWAPS = {
    "plain": (dict(), lambda gm: gm),
    "reserve_rank_": (dict(), lambda gm: lora_fx.reserve_rank_(gm, 8)),
    "lower rank, other alpha": (dict(), _lower_rank),
    "non-zero padding": (dict(), _nonzero_padding),
    "set_scale_ 0.5": (dict(), lambda gm: lora_fx.set_scale_(gm, 0.5)),
    "set_scale_ -1.5": (dict(), lambda gm: lora_fx.set_scale_(gm, -1.5)),
    "set_adapter_weights": (dict(), lambda gm: lora_fx.set_adapter_weights(gm, {"default": 0.3})),
    "disabled": (dict(), lambda gm: lora_fx.enable_adapters_(gm, False)),
    "rslora + reserve_rank_": (dict(use_rslora=True), lambda gm: lora_fx.reserve_rank_(gm, 7)),
    "dora": (dict(use_dora=True, targets=["qkv.weight", "conv.weight", "fc.weight"]), lambda gm: gm),
    "dora, lower rank, other alpha": (dict(use_dora=True, targets=["qkv.weight", "conv.weight", "fc.weight"]),
                                      _lower_rank),
    "fused blocks": (dict(fused=FUSED), lambda gm: gm),
}


def _swapped(name):
    base = _base()
    kw, swap = SWAPS[name]
    gm = lora_fx.transform(base, rank=3, alpha=4.0, **kw)
    randomize_(gm, seed=5, scale=0.3, magnitude=0.5)
    return base, swap(gm)


@pytest.mark.parametrize("name", list(SWAPS))
def test_own_file_loads_back_to_the_same_outputs(tmp_path, name):
    base, gm = _swapped(name)
    with torch.no_grad():
        want = gm(X)
        if name != "disabled":
            assert_not_close(want, base(X))  # the adapter is doing something
        assert_close(want, reference_call(base, gm, (X,)).detach())
    path = save_lora_state(gm, tmp_path / "a.safetensors")
    kw, _ = SWAPS[name]
    (stored,) = {s.lora_B.shape[-1] for s in lora_fx.sites(gm)}  # the factors' storage rank (hot-swaps pad it)
    # the same storage shapes compute bit for bit what the saved model did; a larger reserved rank holds
    # zero padding, whose products the GEMM kernels may sum in another order (within rounding)
    for rank, compare in ((stored, torch.equal), (8 if "fused" not in name else 3, None)):
        fresh = lora_fx.transform(base, rank=rank, alpha=1.0, **kw)  # other alpha
        load_lora_state(fresh, path)
        with torch.no_grad():
            if compare is None:
                assert_close(fresh(X), want)
            else:
                assert compare(fresh(X), want)
        got = {s.param: (s.rank, s.alpha, s.scaling, s.module.mix, s.module.enabled) for s in lora_fx.sites(fresh)}
        assert got == {s.param: (s.rank, s.alpha, s.scaling, s.module.mix, s.module.enabled) for s in lora_fx.sites(gm)}


@pytest.mark.parametrize("name", list(SWAPS))
def test_peft_file_loads_in_peft_and_lora_fx_to_the_same_outputs(tmp_path, name):
    base, gm = _swapped(name)
    if name == "disabled":  # a PEFT file holds the adapter as it computes when active
        active = copy.deepcopy(gm)
        lora_fx.enable_adapters_(active, True)
    else:
        active = gm
    lora_fx.save_adapter(gm, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    with torch.no_grad():
        want = active(X)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
        assert_close(pm(X), want)
        back = lora_fx.load_adapter(base, tmp_path / "p")
        assert_close(back(X), want)
    if name in ("reserve_rank_", "rslora + reserve_rank_"):
        assert config["r"] == 3 and not config["rank_pattern"]  # zero padding is not saved
    if name == "fused blocks":  # two rank-3 blocks: one rank-6 pair, alpha scaled to keep alpha / r
        assert config["rank_pattern"] == {"^qkv": 6} and config["alpha_pattern"] == {"^qkv": 8.0}


def test_peft_refuses_what_it_cannot_hold_and_says_how(tmp_path):
    base, gm = _swapped("dora")
    lora_fx.set_scale_(gm, 0.5)
    with pytest.raises(lora_fx.UnsupportedSiteError, match=r"DoRA adapter with mixing weight 0.5.*set_scale_\(gm, 1.0\)"):
        lora_fx.save_adapter(gm, tmp_path / "d")
    base, gm = _swapped("plain")
    lora_fx.set_scale_(gm, 0.0)
    with pytest.raises(lora_fx.UnsupportedSiteError, match="mixing weight 0 switches the adapter off"):
        lora_fx.save_adapter(gm, tmp_path / "z")
    assert not (tmp_path / "d").exists() and not (tmp_path / "z").exists()
    # the own file holds any state
    load_lora_state(lora_fx.transform(base, rank=3), save_lora_state(gm, tmp_path / "z.safetensors"))
