"""dtypes and devices: half-precision bases with fp32 or same-dtype adapters, autocast, moving the
module with ``.to`` / ``.half``, and the one-rounding fold of bf16 weights (CASES.md 7)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from _reference import lora_weight, randomize_, reference_call
from _tolerance import assert_close

HALF = [torch.bfloat16, torch.float16]


class Mixed(nn.Module):
    """Embedding → Linear → Conv1d → x @ W: one site of each factored kind, non-square shapes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 12)
        self.fc = nn.Linear(12, 10)
        self.conv = nn.Conv1d(10, 6, 3, padding=1)
        self.w = nn.Parameter(torch.randn(6, 9) / 3)

    def forward(self, idx):
        h = F.gelu(self.fc(self.emb(idx)))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return h @ self.w


def _randomise(gm, std=0.3):
    randomize_(gm, scale=std)


def _reference(model, gm, x, dtype=torch.float64):
    """``functional_call(model, {W: W + s·B@A})`` computed in ``dtype`` from the same values."""
    with torch.no_grad():
        return reference_call(model, gm, (x,), dtype=dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("adapter_dtype", [None, "same", "float32"])
def test_half_base_runs_and_returns_base_dtype(dtype, adapter_dtype):
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    ad = str(dtype).replace("torch.", "") if adapter_dtype == "same" else adapter_dtype
    gm = lora_fx.transform(model, rank=3, alpha=6, lowering="factored", adapter_dtype=ad)
    expect = dtype if adapter_dtype == "same" else torch.float32  # None → fp32 for half bases
    assert {s.lora_A.dtype for s in lora_fx.sites(gm)} == {expect}
    assert {s.lora_B.dtype for s in lora_fx.sites(gm)} == {expect}
    _randomise(gm)
    idx = torch.randint(0, 13, (2, 7))
    y = gm(idx)
    assert y.dtype == dtype and y.shape == (2, 7, 9)
    assert_close(y, _reference(model, gm, idx), dtype=dtype)
    y.float().square().mean().backward()
    for s in lora_fx.sites(gm):
        assert s.lora_A.grad.dtype == expect and torch.isfinite(s.lora_A.grad).all()
    assert all(p.grad is None for n, p in gm.named_parameters() if "lora_" not in n)
    # merge lowering agrees too
    gm_m = lora_fx.transform(model, rank=3, alpha=6, lowering="merge", adapter_dtype=ad)
    gm_m.load_state_dict(gm.state_dict())
    assert gm_m(idx).dtype == dtype


def test_cases7_bf16_linear():
    """CASES.md 7: bf16 Linear(16, 16), fp32 adapters, bf16 input: runs, returns bf16; after
    ``.to(torch.float64)`` everything is float64; adapters sit on their weight's device."""
    torch.manual_seed(0)
    lin = nn.Linear(16, 16).to(torch.bfloat16)
    gm = lora_fx.transform(lin, rank=4)
    _randomise(gm)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert gm(x).dtype == torch.bfloat16
    site = lora_fx.sites(gm)[0]
    assert site.lora_A.dtype == site.lora_B.dtype == torch.float32
    gm.to(torch.float64)
    assert {t.dtype for t in gm.parameters()} | {t.dtype for t in gm.buffers()} == {torch.float64}
    y = gm(x.double())
    assert y.dtype == torch.float64
    assert_close(y, _reference(lin, gm, x.double()))
    assert all(p.device == gm.weight.device for p in gm.parameters())


def test_autocast_cpu():
    torch.manual_seed(0)
    model = Mixed()
    gm = lora_fx.transform(model, rank=3)
    _randomise(gm)
    idx = torch.randint(0, 13, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gm(idx)
        ref = _reference(model, gm, idx, torch.float32)
    assert y.dtype == ref.dtype == torch.bfloat16
    assert_close(y, _reference(model, gm, idx), dtype=torch.bfloat16)
    y.float().sum().backward()
    assert all(s.lora_A.grad is not None and s.lora_A.grad.dtype == torch.float32 for s in lora_fx.sites(gm))


@pytest.mark.parametrize("how", ["to_float64", "double", "half", "bfloat16", "to_cpu", "to_meta"])
def test_moving_the_module_moves_adapters(how):
    torch.manual_seed(0)
    model = Mixed()
    gm = lora_fx.transform(model, rank=3, alpha=6)
    _randomise(gm)
    idx = torch.randint(0, 13, (2, 7))
    want_dtype = {"to_float64": torch.float64, "double": torch.float64, "half": torch.float16,
                  "bfloat16": torch.bfloat16}.get(how, torch.float32)
    want_device = torch.device("meta") if how == "to_meta" else torch.device("cpu")
    moved = {"to_float64": lambda m: m.to(torch.float64), "double": lambda m: m.double(),
             "half": lambda m: m.half(), "bfloat16": lambda m: m.bfloat16(),
             "to_cpu": lambda m: m.to("cpu"), "to_meta": lambda m: m.to("meta")}[how](gm)
    assert moved is gm  # nn.Module semantics: in place, returns self
    tensors = list(gm.parameters()) + list(gm.buffers())
    assert {t.dtype for t in tensors} == {want_dtype}
    assert {t.device for t in tensors} == {want_device}
    assert all(s.lora_A.device == gm.get_parameter(s.param).device for s in lora_fx.sites(gm))
    if how == "to_meta":
        y = gm(idx.to("meta"))
        assert y.device.type == "meta" and y.shape == (2, 7, 9)
        return
    y = gm(idx)
    assert y.dtype == want_dtype
    assert_close(y, _reference(model, gm, idx), dtype=want_dtype)
    assert lora_fx.fold(gm)(idx).dtype == want_dtype


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("adapter_dtype", [None, "same"])
def test_fold_half_rounds_once(dtype, adapter_dtype):
    """fold of a bf16/fp16 weight is exactly ``(W.float() + ΔW.float()).to(dtype)``: computed in
    float32 and rounded once (scaling 2: a power of two, so ``s·(B@A) == B@(s·A)`` bit for bit)."""
    torch.manual_seed(0)
    model = Mixed().to(dtype)
    ad = str(dtype).replace("torch.", "") if adapter_dtype == "same" else None
    gm = lora_fx.transform(model, rank=3, alpha=6, adapter_dtype=ad)
    _randomise(gm, std=0.5)
    folded = lora_fx.fold(gm)
    some_differ = False
    for s in lora_fx.sites(gm):
        w = model.get_parameter(s.param)
        expect = lora_weight(w, s.lora_A.detach(), s.lora_B.detach(), s.scaling)  # fp32, rounded once
        delta = s.scaling * (s.lora_B.detach().float() @ s.lora_A.detach().float()).reshape(w.shape)
        got = folded.get_parameter(s.param)
        assert got.dtype == dtype and torch.equal(got, expect), s.param
        some_differ |= not torch.equal(got, w + delta.to(dtype))  # two roundings would differ
    assert some_differ
    idx = torch.randint(0, 13, (2, 7))
    assert folded(idx).dtype == dtype
    plain = copy.deepcopy(model)
    plain.load_state_dict(folded.state_dict(), strict=True)
