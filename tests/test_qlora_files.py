"""Adapter files made on a quantized base load on the float base and back (own files and PEFT's
format), and a file real PEFT made on a quantized base loads into lora_fx on the same base with
the same outputs.  The layout of a linear's adapter does not depend on how its weight is stored."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_fx
from lora_fx.io.native import load_lora_state, save_lora_state

from _quantized import D_IN, float_twin, kind, mlp, quiet_import
from _reference import randomize_, reference_call
from _tolerance import EXACT, assert_close

KINDS = ["torchao-nf4", "torchao-int8", "bnb-nf4-dq", "bnb-int8"]


def _x(seed=2):
    return torch.randn(3, 4, D_IN, generator=torch.Generator().manual_seed(seed))


def _values(gm):
    return {k: v.detach() for k, v in lora_fx.lora_state_dict(gm).items()}


@pytest.mark.parametrize("fmt", ["peft", "own"])
@pytest.mark.parametrize("name", KINDS)
def test_files_move_between_the_quantized_and_the_float_base(name, fmt, tmp_path):
    quantized = kind(name).build(torch.float32)
    float_base = mlp(torch.float32)  # the model that was quantized
    twin = float_twin(quantized)
    gm_q = randomize_(lora_fx.transform(quantized, rank=4, alpha=8), scale=0.1)
    if fmt == "peft":
        lora_fx.save_adapter(gm_q, tmp_path / "q")
        gm_f = lora_fx.load_adapter(float_base, tmp_path / "q")
    else:
        save_lora_state(gm_q, tmp_path / "q.safetensors")
        gm_f = load_lora_state(lora_fx.transform(float_base, rank=4, alpha=8), tmp_path / "q.safetensors")
    assert_close(_values(gm_f), _values(gm_q), **EXACT)
    x = _x()
    with torch.no_grad():
        assert_close(gm_f(x), reference_call(float_base, gm_f, (x,)), dtype=torch.float32)
    # and back: an adapter trained on the float base, onto the quantized one
    randomize_(gm_f, seed=5, scale=0.1)
    if fmt == "peft":
        lora_fx.save_adapter(gm_f, tmp_path / "f")
        back = lora_fx.load_adapter(quantized, tmp_path / "f")
    else:
        save_lora_state(gm_f, tmp_path / "f.safetensors")
        back = load_lora_state(lora_fx.transform(quantized, rank=4, alpha=8), tmp_path / "f.safetensors")
    assert_close(_values(back), _values(gm_f), **EXACT)
    with torch.no_grad():
        assert_close(back(x), reference_call(twin, back, (x,)), dtype=torch.float32)


def test_a_file_real_peft_trained_on_a_4bit_base_gives_peft_outputs(tmp_path):
    peft = quiet_import("peft")
    quiet_import("bitsandbytes")
    base = kind("bnb-nf4-dq").build(torch.float32)
    for i in (0, 2):  # PEFT's own model must not repack either (see lora_fx.rules.bnb)
        base[i].support_avx512bf16_for_cpu = False
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):  # real training: B leaves zero
        opt.zero_grad()
        pm(_x(10 + step)).square().mean().backward()
        opt.step()
    pm.save_pretrained(tmp_path)
    opt.zero_grad(set_to_none=True)
    gm = lora_fx.load_adapter(base, tmp_path)
    x = _x()
    pm.train(), gm.train()
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_peft, y_ours = pm(x1), gm(x2)
    assert_close(y_ours, y_peft, dtype=torch.float32)
    y_peft.square().mean().backward()
    y_ours.square().mean().backward()
    assert_close(x2.grad, x1.grad, dtype=torch.float32)
    peft_a = dict(pm.named_parameters())["base_model.model.0.lora_A.default.weight"]
    assert_close(lora_fx.sites(gm)[0].lora_A.grad, peft_a.grad, dtype=torch.float32)
