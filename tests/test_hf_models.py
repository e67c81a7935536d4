"""Hugging Face models with their default configs and no example inputs: ``transform`` keeps the
model's class, every site is exact against the functional reference (outputs and gradients, with
non-zero A and B), and ``fold`` gives the plain model back (``save_pretrained`` →
``from_pretrained`` round-trips, tied weights included)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import lora_fx
from lora_fx import state

from _hf import NAMES, inputs, targets, tiny
from _reference import leaf_factors, randomize_, reference_call
from _tolerance import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::lora_fx.LoraFxWarning", "ignore::FutureWarning")


def _logits(out):
    return out.logits


@pytest.mark.parametrize("name", NAMES)
def test_default_config_keeps_its_class_and_is_exact(name):
    model = tiny(name)
    gm = lora_fx.transform(model, rank=4)  # no example inputs, default targets
    assert type(gm) is type(model) and state.frontend_of(gm) == "regions"
    assert all(type(gm.get_submodule(n)) is type(m) for n, m in model.named_modules())
    assert gm.config is not model.config and gm.config.to_dict() == model.config.to_dict()
    randomize_(gm, scale=0.2)
    kw = inputs(name)
    torch.manual_seed(0)
    out = _logits(gm(**kw))
    torch.manual_seed(0)
    ref = _logits(reference_call(model, gm, (), kw))
    assert_close(out, ref)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    factors = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    for a, b in zip(torch.autograd.grad(out, factors, gy), torch.autograd.grad(ref, factors, gy)):
        assert_close(a, b)
    folded = lora_fx.fold(gm)
    assert type(folded) is type(model) and list(folded.state_dict()) == list(model.state_dict())
    assert all(state.region_of(m) is None and "lora" not in m._modules for m in folded.modules())
    torch.manual_seed(0)
    assert_close(_logits(folded(**kw)), ref)


@pytest.mark.parametrize("name, dtype, train", [("llama", torch.bfloat16, False), ("gpt2", torch.float32, True),
                                                ("bart", torch.float32, True)])
def test_bf16_and_training_mode_with_dropout(name, dtype, train):
    model = tiny(name).to(dtype).train(train)
    gm = randomize_(lora_fx.transform(model, rank=4, targets=targets(name)), scale=0.3)
    assert gm.training == train
    kw = inputs(name)
    # bf16: against the same values computed in float64 (two layers of bf16 rounding on both sides of the
    # comparison would be compared otherwise), gradients allowing a few dozen roundings
    ref_dtype, ulps = (torch.float64, 32) if dtype == torch.bfloat16 else (None, None)
    factors = leaf_factors(gm, dtype=ref_dtype)
    torch.manual_seed(5)  # the same dropout masks in both runs
    out = _logits(gm(**kw))
    torch.manual_seed(5)
    ref = _logits(reference_call(model, gm, (), kw, dtype=ref_dtype, factors=factors))
    assert out.dtype == dtype
    assert_close(out, ref, dtype=dtype)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    ours = torch.autograd.grad(out, [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)], gy.to(dtype))
    want = torch.autograd.grad(ref, [t for pair in factors.values() for t in pair], gy.to(ref.dtype))
    for a, b in zip(ours, want):
        assert_close(a, b, dtype=dtype, ulps=ulps)


@pytest.mark.parametrize("name, tied", [
    ("llama", []),
    ("gpt2", ["transformer.wte.weight", "lm_head.weight"]),
    ("bart", ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
              "lm_head.weight"]),
])
def test_save_pretrained_round_trips_adapted_and_folded(name, tied, tmp_path):
    model = tiny(name)
    gm = randomize_(lora_fx.transform(model, rank=4, targets=targets(name) + tied), scale=0.3)
    if tied:  # one adapter for every name of the tied weight, registered once
        site = next(s for s in lora_fx.sites(gm) if s.param == tied[0])
        assert sorted(site.aliases) == sorted(tied)
        owners = [k for k in gm.state_dict() if k.endswith("lora_A") and f"{k.split('.lora.')[0]}.weight" in tied]
        assert len(owners) == 1
    kw = inputs(name)
    want = _logits(gm(**kw))
    gm.save_pretrained(tmp_path / "adapted")  # no shared-tensor error: every adapter has one name
    folded = lora_fx.fold(gm)
    if tied:
        assert all(folded.get_parameter(n) is folded.get_parameter(tied[0]) for n in tied)
    folded.save_pretrained(tmp_path / "folded")
    loaded = type(model).from_pretrained(tmp_path / "folded").eval()
    assert_close(_logits(loaded(**kw)), want)
    assert_close(_logits(loaded(**kw)), _logits(folded(**kw)), ulps=0)


def test_copies_and_torch_save_of_an_adapted_hf_model():
    model = tiny("llama")
    gm = randomize_(lora_fx.transform(model, rank=4, targets=targets("llama")))
    kw = inputs("llama")
    want = _logits(gm(**kw))
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    for other in (copy.deepcopy(gm), torch.load(buf, weights_only=False)):
        assert type(other) is type(model)
        assert_close(_logits(other(**kw)), want, ulps=0)
        assert lora_fx.sites(other)[0].module is other.model.layers[0].self_attn.q_proj.lora["default"]["weight"]


def test_summary_says_how_each_module_was_captured():
    gm = lora_fx.transform(tiny("t5"), rank=2, targets=targets("t5"))
    table = lora_fx.summary(gm, show=False)
    how = {r["module"]: r["captured"] for r in table.captured}
    assert how[""].startswith("kept: forward has optional or variadic arguments")
    assert how["encoder.block.0.layer.0.SelfAttention.q"] == "fx"
    # T5LayerNorm branches on its weight's dtype: a leaf of the feed-forward layer's graph
    assert how["encoder.block.0.layer.1"] == "fx (leaves: layer_norm)"
    rows = {r["site"]: r["captured"] for r in table.rows}
    assert rows["encoder.block.0.layer.1.DenseReluDense.wi.weight"] == "fx (leaves: layer_norm)"
    assert table.not_captured == ()
    assert "T5LayerFF" in str(table) and "encoder.block.* (x2)" in str(table)


def test_adapter_files_own_and_peft_on_a_model_that_kept_its_class(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny("llama")
    gm = randomize_(lora_fx.transform(model, rank=4, targets=targets("llama")), scale=0.3)
    lora_fx.mark_only_lora_as_trainable(gm)
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == set(lora_fx.lora_state_dict(gm))
    kw = inputs("llama")
    want = _logits(gm(**kw))
    own = lora_fx.io.save_lora_state(gm, tmp_path / "adapter.safetensors")
    fresh = lora_fx.transform(model, rank=4, targets=targets("llama"))
    assert_close(_logits(lora_fx.io.load_lora_state(fresh, own)(**kw)), want, ulps=0)
    lora_fx.save_adapter(gm, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(tiny("llama"), tmp_path / "peft").eval()
    assert_close(_logits(theirs(**kw)), want)
    back = lora_fx.load_adapter(tiny("llama"), tmp_path / "peft")
    assert type(back) is type(model) and state.frontend_of(back) == "regions"
    assert_close(_logits(back(**kw)), want)
