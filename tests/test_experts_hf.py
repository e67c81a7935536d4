"""Per-expert adapters in transformers' Mixtral, Qwen3-MoE and OLMoE (tiny configs, default
settings: the ``grouped_mm`` experts), against the functional reference (logits and gradients) and
fold."""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_fx

from _moe import hf_moe_model
from _reference import randomize_, reference_call
from _tolerance import assert_close

TARGETS = ["*.experts.gate_up_proj", "*.experts.down_proj"]


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe"])
def test_hf_moe_experts_exact(name):
    model = hf_moe_model(name)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    gm = lora_fx.transform(model, rank=3, targets=TARGETS, example_inputs=(ids,))
    sites = lora_fx.sites(gm)
    assert len(sites) == 4 and {(s.op, s.lowering) for s in sites} == {("experts:grouped_mm", "factored")}
    assert_close(gm(ids).logits, model(ids).logits)  # B = 0
    randomize_(gm, scale=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lora_fx.LoraFxWarning)  # no merged fallback
        out = gm(ids).logits
    ref = reference_call(model, gm, (ids,)).logits
    assert_close(out, ref)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    factors = [p for s in sites for p in (s.lora_A, s.lora_B)]
    for a, b in zip(torch.autograd.grad(out, factors, gy), torch.autograd.grad(ref, factors, gy)):
        assert_close(a, b)
    plain = hf_moe_model(name)
    plain.load_state_dict(lora_fx.fold(gm).state_dict(), strict=True)
    assert_close(plain(ids).logits, ref.detach())
