"""fold on quantized bases: by default plain float weights ``dequantize(W_q) + ΔW`` in the compute
dtype (bitsandbytes linears become ``nn.Linear``), loadable with ``strict=True`` into the float
model; ``requantize=True`` keeps the base's scheme and records the error; ``export_folded`` works on
the float fold."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.ops_quantized import bnb_linear, quantized_linear

from _quantized import D_IN, float_twin, kind, mlp, quiet_import
from _reference import randomize_, reference_call
from _tolerance import assert_close

FOLDABLE = ["torchao-nf4", "torchao-int8", "torchao-intx-int4", "torchao-float8", "bnb-nf4-dq", "bnb-fp4", "bnb-int8"]


def _x(dtype, seed=5):
    return torch.randn(3, 4, D_IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _calls(module):
    return [n.target for m in module.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes
            if n.op == "call_function"]


@pytest.mark.parametrize("lowering", ["factored", "merge"])
@pytest.mark.parametrize("name", FOLDABLE)
def test_float_fold_is_the_adapted_function_and_loads_into_the_float_model(name, lowering):
    model = kind(name).build(torch.bfloat16)
    twin = float_twin(model)
    with pytest.warns(lora_fx.LoraFxWarning) if lowering == "merge" else contextlib.nullcontext():
        gm = randomize_(lora_fx.transform(model, rank=4, alpha=8, lowering=lowering), scale=0.1)
    # bitsandbytes' int8 keeps no dtype: it folds to the model's own (the biases' bfloat16 here)
    folded = lora_fx.fold(gm)
    for i in ("0", "2"):
        layer = getattr(folded, i)
        assert type(layer) is nn.Linear and type(layer.weight) is nn.Parameter, (i, type(layer), type(layer.weight))
        assert layer.weight.dtype == torch.bfloat16 and tuple(layer.weight.shape) == ((256, 128) if i == "0" else (128, 256))
    assert quantized_linear not in _calls(folded) and bnb_linear not in _calls(folded)
    assert folded.meta["lora_fx"]["folded"] == ["0.weight", "2.weight"] and "requantization_error" not in folded.meta["lora_fx"]
    x = _x(torch.bfloat16)
    with torch.no_grad():
        want = reference_call(twin, gm, (x,))
        assert_close(folded(x), want, dtype=torch.bfloat16)
        plain = mlp(torch.bfloat16)  # the float architecture the user quantized
        plain.load_state_dict(folded.state_dict(), strict=True)
        assert_close(plain(x), want, dtype=torch.bfloat16)
    assert type(getattr(gm, "0").weight).__name__ == type(model[0].weight).__name__  # gm keeps its quantized base


@pytest.mark.parametrize("name", ["torchao-nf4", "torchao-int8", "torchao-intx-int4", "bnb-nf4-dq", "bnb-int8"])
def test_requantized_fold_keeps_the_scheme_and_records_its_error(name):
    model = kind(name).build(torch.bfloat16)
    gm = randomize_(lora_fx.transform(model, rank=4, alpha=8), scale=0.1)
    requantized = lora_fx.fold(gm, requantize=True, dtype=torch.bfloat16 if name == "bnb-int8" else None)
    floated = lora_fx.fold(gm, dtype=torch.bfloat16 if name == "bnb-int8" else None)
    errors = requantized.meta["lora_fx"]["requantization_error"]
    assert set(errors) == {"0.weight", "2.weight"}
    for i in ("0", "2"):
        q, f = getattr(requantized, i), getattr(floated, i)
        assert type(q) is type(getattr(gm, i)) and type(q.weight) is type(getattr(gm, i).weight)
        ref_deq = _library_requantized(name, f.weight.detach(), getattr(gm, i))
        err = (ref_deq.double() - f.weight.detach().double()).abs()
        assert errors[f"{i}.weight"]["max"] == pytest.approx(err.max().item(), rel=1e-6, abs=1e-9)
        assert errors[f"{i}.weight"]["mean"] == pytest.approx(err.mean().item(), rel=1e-6, abs=1e-9)
        assert 0 < errors[f"{i}.weight"]["max"] < 0.2 * f.weight.detach().abs().max().item()
    x = _x(torch.bfloat16)
    with torch.no_grad():
        a, b = requantized(x), floated(x)
    assert torch.isfinite(a).all() and ((a.float() - b.float()).abs().max() / b.float().abs().max()) < 0.3


def _library_requantized(name, w, layer):
    """The float fold quantized again by the library's own API, then dequantized by it."""
    if name == "torchao-nf4":
        from torchao.quantization import to_nf4

        return to_nf4(w, layer.weight.block_size, layer.weight.scaler_block_size).get_original_weight()
    if name.startswith("torchao"):
        from torchao.quantization import quantize_

        from _quantized import _ao  # the same config the base was made with

        lin = nn.Sequential(nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=w.dtype))
        lin[0].weight.data = w.clone()
        quantize_(lin, _ao(name[len("torchao-"):])())
        return lin[0].weight.dequantize()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bF

    if name == "bnb-int8":
        cb, scb, _ = bF.int8_vectorwise_quant(w.to(torch.float16))
        return bF.int8_vectorwise_dequant(cb, scb)
    q = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=layer.weight.blocksize,
                          compress_statistics=layer.weight.compress_statistics, quant_type=layer.weight.quant_type).to("cpu")
    return bF.dequantize_4bit(q.data, q.quant_state)


@pytest.mark.parametrize("name", ["torchao-nf4", "bnb-nf4-dq"])
def test_export_folded_on_the_float_fold(name):
    model = kind(name).build(torch.float32)
    gm = randomize_(lora_fx.transform(model, rank=4, alpha=8), scale=0.1)
    ep = lora_fx.export_folded(gm, (_x(torch.float32),), dynamic_shapes=False)
    assert not any("lora" in k for k in ep.state_dict)
    with torch.no_grad():
        assert_close(ep.module()(_x(torch.float32, 6)), gm(_x(torch.float32, 6)), dtype=torch.float32)


def test_unadapted_quantized_layers_stay_quantized():
    quiet_import("torchao")
    model = kind("torchao-nf4").build(torch.bfloat16)
    gm = randomize_(lora_fx.transform(model, rank=4, targets=["2.weight"]), scale=0.1)
    folded = lora_fx.fold(gm)
    assert type(getattr(folded, "0").weight).__name__ == "NF4Tensor"
    assert type(getattr(folded, "2").weight) is nn.Parameter
    with torch.no_grad():
        assert_close(folded(_x(torch.bfloat16)), gm(_x(torch.bfloat16)), dtype=torch.bfloat16)
