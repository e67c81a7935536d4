"""Training features on quantized bases: bf16 autocast, activation checkpointing per block, named
adapters and hot-swapping, ``torch.compile`` (two kinds here; the docs table lists them all)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_fx

from _quantized import D_IN, float_twin, kind, mlp, quiet_import
from _reference import check_matches_reference, randomize_, reference_call
from _tolerance import EXACT, assert_close


def _x(dtype=torch.float32, seed=3, requires_grad=False):
    return torch.randn(2, 5, D_IN, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("name", ["torchao-nf4", "bnb-nf4-dq"])
def test_bf16_autocast_on_an_fp32_quantized_base(name):
    model = kind(name).build(torch.float32)
    if name.startswith("bnb"):  # bitsandbytes casts the input to its compute dtype: let autocast decide
        for i in (0, 2):
            model[i].compute_dtype = None
    twin = float_twin(model)
    gm = randomize_(lora_fx.transform(model, rank=4, alpha=8), scale=0.1)
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        check_matches_reference(twin, gm, (x,), dtype=torch.bfloat16)


class Blocks(nn.Module):
    """Two residual MLP blocks in an ``nn.ModuleList`` (traced as called sub-GraphModules)."""

    def __init__(self, make):
        super().__init__()
        self.blocks = nn.ModuleList([make(seed) for seed in (0, 1)])

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


def _bnb_mlp(seed):
    import bitsandbytes as bnb

    m = mlp(torch.bfloat16, seed)
    for i in (0, 2):
        q = bnb.nn.Linear4bit(m[i].in_features, m[i].out_features, compute_dtype=torch.bfloat16,
                              quant_type="nf4").to(torch.bfloat16)
        q.load_state_dict(m[i].state_dict())
        m[i] = q.to("cpu")
    return m


def test_activation_checkpointing_per_block_gives_the_same_gradients():
    quiet_import("bitsandbytes")
    model = Blocks(_bnb_mlp)
    gm = randomize_(lora_fx.transform(model, rank=4), scale=0.1)
    x = _x(torch.bfloat16)

    def grads():
        gm.zero_grad(set_to_none=True)
        gm(x).float().square().mean().backward()
        return {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}

    plain = grads()
    lora_fx.distributed.checkpoint_blocks_(gm)
    assert_close(grads(), plain, **EXACT)


@pytest.mark.parametrize("name", ["torchao-nf4", "bnb-nf4-dq"])
def test_named_adapters_and_hot_swap(name):
    model = kind(name).build(torch.bfloat16)
    twin = float_twin(model)
    gm = lora_fx.transform(model, rank=4, alpha=8)
    lora_fx.add_adapter(gm, "other", rank=2, alpha=2)
    randomize_(gm, scale=0.1)
    x = _x(torch.bfloat16)
    with torch.no_grad():
        for mix in ({"default": 1.0}, {"other": 1.0}, {"default": 0.5, "other": 1.0}):
            if len(mix) == 1:
                lora_fx.set_active_adapters(gm, list(mix))
            else:
                lora_fx.set_adapter_weights(gm, mix)
            assert_close(gm(x), reference_call(twin, gm, (x,), weights=mix), dtype=torch.bfloat16)
    lora_fx.delete_adapter(gm, "other")
    lora_fx.set_active_adapters(gm, "default")
    check_matches_reference(twin, gm, (x,), dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["torchao-nf4", "bnb-nf4-dq"])
def test_compiled_training_step_equals_eager_without_graph_breaks_or_recompiles(name):
    model = kind(name).build(torch.bfloat16)
    gm = lora_fx.transform(model, rank=4, alpha=8)
    lora_fx.add_adapter(gm, "other", rank=4, alpha=8, activate=True)
    randomize_(gm, scale=0.1)
    x = _x(torch.bfloat16)
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises

    def step(fn):
        gm.zero_grad(set_to_none=True)
        y = fn(x)
        y.float().square().mean().backward()
        return y.detach(), {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}

    for active in ("default", "other", "default"):  # hot-swap between calls
        lora_fx.set_active_adapters(gm, active)  # scaling buffers only: requires_grad is left alone
        want = step(gm)
        got = step(compiled)
        assert_close(got, want, dtype=torch.bfloat16)
    assert counts["stats"]["unique_graphs"] == 1  # swapping adapters never recompiled
