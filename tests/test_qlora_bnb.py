"""bitsandbytes linears on lora_fx's own copies: no in-place CPU repack (an evaluation pass never
changes later gradients), a fixed compute dtype and no parameter cast in place, the 8-bit row scales
kept on the weight, shared weights that the user's model cannot corrupt, copies and state dicts."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lora_fx
from lora_fx import weights

from _quantized import D_IN, float_twin, kind, quiet_import
from _reference import check_matches_reference, randomize_
from _tolerance import EXACT, assert_close

bnb = quiet_import("bitsandbytes")


def _x(dtype=torch.bfloat16, seed=3):
    return torch.randn(2, 6, D_IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _grads(gm, x):
    gm.zero_grad(set_to_none=True)
    gm.train()
    gm(x).float().square().mean().backward()
    return {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}


def _cpu_repacks() -> bool:
    from bitsandbytes.functional import has_avx512bf16  # bitsandbytes' own probe

    return bool(has_avx512bf16())


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "bnb-fp4"])
def test_an_evaluation_pass_never_changes_training(name):
    model = kind(name).build(torch.bfloat16)
    twin = float_twin(model)
    gm = randomize_(lora_fx.transform(model, rank=4), scale=0.1)
    x = _x()
    before = _grads(gm, x)
    packed = {n: (m.weight.data.clone(), m.weight.shape) for n, m in gm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    gm.eval()
    with torch.no_grad():  # an evaluation pass: bitsandbytes would repack the weights in place here
        gm(x)
    for n, m in gm.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert m.weight.shape == packed[n][1] and torch.equal(m.weight.data, packed[n][0])
            assert not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    after = _grads(gm, x)
    assert_close(after, before, **EXACT)
    check_matches_reference(twin, gm, (x,), dtype=torch.bfloat16)


@pytest.mark.skipif(not _cpu_repacks(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_a_model_repacked_before_transform_is_converted_back_on_the_copy():
    import bitsandbytes.functional as bF

    model = kind("bnb-nf4-dq").build(torch.float32)
    model.eval()
    with torch.no_grad():
        model(_x(torch.float32))  # the user's model repacks itself in place (scales rounded to bf16)
    assert getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
    twin = float_twin(model)  # what the repacked model holds, by bitsandbytes' own inverse conversion
    for i in (0, 2):
        w = model[i].weight
        data, qs = bF._convert_weight_packed_for_cpu_inverse(w.data.clone(), copy.deepcopy(w.quant_state))
        twin[i].weight.data = bF.dequantize_4bit(data, qs).to(qs.dtype)
    with pytest.warns(lora_fx.LoraFxWarning) as caught:
        gm = lora_fx.transform(model, rank=4)
    repacked = [str(w.message) for w in caught if "had repacked" in str(w.message)]
    assert repacked == [repacked[0]] and repacked[0].startswith(  # one warning naming every layer
        "2 module(s), '0' (Linear4bit), '2' (Linear4bit): bitsandbytes had repacked these weights")
    assert getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)  # the user's model is left as it is
    randomize_(gm, scale=0.1)
    check_matches_reference(twin, gm, (_x(torch.float32),))


def test_compute_dtype_is_fixed_and_no_forward_casts_a_parameter_in_place():
    model = kind("bnb-nf4-dq").build(torch.bfloat16)
    for i in (0, 2):
        model[i].compute_dtype, model[i].compute_type_is_set = None, False  # bitsandbytes' default
        model[i].bias.data = model[i].bias.data.float()
    gm = lora_fx.transform(model, rank=4)
    layer = getattr(gm, "0")
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16  # the quantized-from dtype
    assert model[0].compute_dtype is None and model[0].bias.dtype == torch.float32  # the user's model: untouched
    ptrs = {n: p.data_ptr() for n, p in gm.named_parameters()}
    gm(_x()).float().sum().backward()
    gm(_x(torch.float32))
    assert {n: p.data_ptr() for n, p in gm.named_parameters()} == ptrs


def test_int8_row_scales_stay_on_the_weight():
    model = kind("bnb-int8").build(torch.float32)
    model(_x(torch.float32))  # the user's forward moves SCB into the module's state
    assert model[0].weight.SCB is None and model[0].state.SCB is not None
    gm = lora_fx.transform(model, rank=4)
    gm(_x(torch.float32))
    w = getattr(gm, "0").weight
    assert w.SCB is not None and w.SCB is getattr(gm, "0").state.SCB
    deq = weights.dequantize(w)
    assert deq.shape == (256, 128) and deq.dtype == torch.float32
    with pytest.raises(ValueError, match="no row scales"):
        weights.dequantize(model[0].weight)  # the user's own weight after its forward: says where they went


@pytest.mark.parametrize("name", ["bnb-nf4-dq", "bnb-int8", "torchao-nf4", "torchao-int8"])
def test_copy_weights_false_shares_the_quantized_storage(name):
    model = kind(name).build(torch.bfloat16)
    gm = lora_fx.transform(model, rank=4, copy_weights=False)
    for i in ("0", "2"):
        mine, theirs = getattr(gm, i).weight, model[int(i)].weight
        assert type(mine) is type(theirs) and weights.logical_shape(mine) == weights.logical_shape(theirs)
        assert mine.data_ptr() == theirs.data_ptr()  # no copy of the quantized data
        if name.startswith("torchao"):
            assert mine is theirs  # never written: the very same tensor
    randomize_(gm, scale=0.1)
    gm(_x()).float().sum().backward()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.skipif(not _cpu_repacks(), reason="bitsandbytes repacks 4-bit weights only on AVX512-BF16 CPUs")
def test_the_users_repack_after_transform_does_not_reach_shared_weights():
    model = kind("bnb-nf4-dq").build(torch.bfloat16)
    twin = float_twin(model)
    gm = randomize_(lora_fx.transform(model, rank=4, copy_weights=False), scale=0.1)
    model.eval()
    with torch.no_grad():
        model(_x())  # repacks the user's modules in place
    assert getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
    check_matches_reference(twin, gm, (_x(),), dtype=torch.bfloat16)


def test_copies_pickles_and_state_dicts():
    model = kind("bnb-nf4-dq").build(torch.bfloat16)
    gm = randomize_(lora_fx.transform(model, rank=4), scale=0.1)
    x = _x()
    with torch.no_grad():
        want = gm(x)
        for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
            assert_close(other(x), want, **EXACT)
            assert getattr(other, "0").weight.module is not model[0]  # never the user's module
    keys = set(gm.state_dict())
    assert {"0.weight", "0.weight.absmax", "0.weight.quant_map", "0.weight.nested_absmax",
            "0.lora.default.weight.lora_A"} <= keys
    assert set(lora_fx.lora_state_dict(gm)) == {f"{i}.lora.default.weight.lora_{f}" for i in (0, 2) for f in "AB"}
