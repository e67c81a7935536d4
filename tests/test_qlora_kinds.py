"""The quantized weight kinds themselves (:mod:`lora_fx.weights.torchao`, :mod:`lora_fx.weights.bnb`):
each dequantizes to the weight its own kernel computes with, requantizes into its own scheme, and the
lean NF4 dequantization is bitwise torchao's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lora_fx
from lora_fx import weights

from _quantized import D_IN, kind, quiet_import
from _tolerance import EXACT, assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_lean_nf4_dequantization_is_bitwise_torchaos(dtype):
    quiet_import("torchao")
    from torchao.quantization import to_nf4

    from lora_fx.weights.nf4 import dequantize_nf4

    for shape in ((256, 128), (64, 512)):
        w = to_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype) * 0.02)
        assert_close(dequantize_nf4(w), w.get_original_weight(), **EXACT)


@pytest.mark.parametrize("name", ["torchao-nf4", "torchao-int8", "torchao-intx-int4", "torchao-float8", "bnb-nf4-dq",
                                  "bnb-fp4"])
def test_dequantize_is_what_the_kernel_computes_with(name):
    model = kind(name).build(torch.float32)
    layer = model[0]
    x = torch.randn(4, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = layer(x)  # the library's own forward
        got = F.linear(x, weights.dequantize(layer.weight).float(), layer.bias)
    assert_close(got, want, dtype=torch.float32)


@pytest.mark.parametrize("name, exact", [("torchao-nf4", True), ("torchao-int8", False), ("torchao-intx-int4", False),
                                         ("bnb-nf4-dq", True), ("bnb-int8", False)])
def test_requantize_keeps_the_scheme_and_is_idempotent_on_its_own_values(name, exact):
    model = kind(name).build(torch.bfloat16)
    w = model[0].weight
    deq = weights.dequantize(w)
    q = weights.requantize(w, deq.float())
    assert type(q) is type(w) and weights.logical_shape(q) == weights.logical_shape(w)
    again = weights.dequantize(q)
    if exact:  # a 4-bit code book maps its own values onto themselves
        assert_close(again.float(), deq.float(), dtype=weights.compute_dtype(w))
    else:  # integer codes: at most one step per row away
        step = deq.float().abs().amax(dim=-1, keepdim=True) / 7 if "int4" in name else deq.float().abs().amax(
            dim=-1, keepdim=True) / 127
        assert ((again.float() - deq.float()).abs() <= step * 1.01 + 1e-6).all()


def test_plain_tensors_keep_the_default_kind():
    w = torch.nn.Parameter(torch.randn(3, 4))
    assert weights.kind_of(w) is weights.TENSOR and weights.runs(w, "conv2d") and not weights.kind_of(w).frozen_linear
    assert weights.share(w) is not w and weights.share(w).data_ptr() == w.data_ptr()
    assert weights.nbytes(w) == 48 and weights.requantize(w, w.detach() * 2).dtype == w.dtype


def test_pissa_and_dora_on_a_quantized_base():
    quiet_import("torchao")
    model = kind("torchao-nf4").build(torch.bfloat16)
    with pytest.raises(lora_fx.ConfigError, match=r"'0\.weight', a torchao-nf4 weight lora_fx cannot write"):
        lora_fx.transform(model, rank=4, init="pissa")
    with pytest.warns(lora_fx.LoraFxWarning, match="lowered by merging"):
        gm = lora_fx.transform(model, rank=4, use_dora=True)
    magnitude = lora_fx.sites(gm)[0].module.lora_magnitude
    assert_close(magnitude.detach(), model[0].weight.get_original_weight().float().norm(dim=1), dtype=torch.bfloat16)
    x = torch.randn(2, D_IN, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_close(gm(x), model(x), dtype=torch.bfloat16)  # B = 0: unchanged
