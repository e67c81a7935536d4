"""Fused projections: per-block adapters on packed weights (qkv in one Linear, gate/up MLPs)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import ops
from lora_fx.fused import FusedSpec
from _reference import delta, leaf_factors, lora_weight, reference_call, set_factors_
from _tolerance import assert_close

IN, Q, K, V = 12, 10, 4, 4  # unequal blocks (18 rows)


class QKV(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.qkv = nn.Linear(IN, Q + K + V, dtype=dtype)

    def forward(self, x):
        return self.qkv(x)


class FunctionalQKV(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(Q + K + V, IN) / 4)

    def forward(self, x):
        return F.linear(x, self.w)


SPEC = {"blocks": {"q": Q, "k": K, "v": V}, "enable": ("q", "v")}


def _fused(model, pattern, lowering, spec=SPEC, **kw):
    gm = lora_fx.transform(model, rank=3, alpha=5.0, lowering=lowering, fused={pattern: spec}, **kw)
    for i, s in enumerate(lora_fx.sites(gm)):
        set_factors_(s, seed=10 + i)
    return gm


@pytest.mark.parametrize("lowering", ["factored", "merge"])
@pytest.mark.parametrize("functional", [False, True])
def test_fused_linear_matches_reference_and_disabled_rows_are_exact(lowering, functional):
    model = FunctionalQKV() if functional else QKV()
    pname = "w" if functional else "qkv.weight"
    gm = _fused(model, pname, lowering)
    (site,) = lora_fx.sites(gm)
    assert site.blocks == (("q", Q, True), ("k", K, False), ("v", V, True))
    assert site.lowering == lowering
    assert tuple(site.lora_A.shape) == (2 * 3, IN) and tuple(site.lora_B.shape) == (Q + V, 3)
    # the library's ΔW has exact zeros on k's rows and equals the independent reference
    dw = site.module.delta_weight()
    assert torch.equal(dw[Q:Q + K], torch.zeros(K, IN))
    assert_close(dw, delta(site))
    # per-block factors: each enabled block has its own rank-3 pair
    bf = site.module.block_factors()
    assert list(bf) == ["q", "v"] and tuple(bf["q"][1].shape) == (Q, 3) and tuple(bf["v"][1].shape) == (V, 3)
    x = torch.randn(2, 5, IN, requires_grad=True)
    y = gm(x)
    base = model(x)
    assert torch.equal(y[..., Q:Q + K], base[..., Q:Q + K])  # k disabled: bit-identical outputs
    # reference: functional_call of the original with W + ΔW (q and v blocks with their own factors,
    # k rows zero), gradients through leaf copies of A, B
    leaves = leaf_factors(gm)
    a, b = leaves[pname, "default"]
    w = model.get_parameter(pname)
    x2 = x.detach().clone().requires_grad_(True)
    ref = reference_call(model, gm, (x2,), factors=leaves)
    g = torch.randn(y.shape)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    assert_close(y, ref)
    assert_close(x.grad, x2.grad)
    assert_close(site.lora_A.grad, a.grad)
    assert_close(site.lora_B.grad, b.grad)
    # fold: k rows of the weight are the original's, bit for bit
    folded = lora_fx.fold(gm)
    fw = folded.get_parameter(pname)
    assert torch.equal(fw[Q:Q + K], w[Q:Q + K])
    with torch.no_grad():
        assert_close(folded(x), ref)


def test_fused_disabled_query_rows_bit_identical_in_mha():
    mha = nn.MultiheadAttention(8, 2)
    gm = lora_fx.transform(mha_model := _MHA(mha), rank=2, fused={"*.in_proj_weight": {"enable": ("k", "v")}})
    site = [s for s in lora_fx.sites(gm) if s.param == "attn.in_proj_weight"][0]
    set_factors_(site, seed=3)
    w = mha_model.attn.in_proj_weight
    merged = ops.merge(w, site.lora_A, site.lora_B, site.module.scaling, site.module.layout)
    assert torch.equal(merged[:8], w[:8])  # the rows projecting queries are untouched
    x = torch.randn(4, 2, 8)
    q_base = F.linear(x, w[:8], mha.in_proj_bias[:8])
    q_merged = F.linear(x, merged[:8], mha.in_proj_bias[:8])
    assert torch.equal(q_base, q_merged)  # projected queries bit-identical to the base
    assert not torch.equal(merged[8:], w[8:])
    folded = lora_fx.fold(gm)
    assert torch.equal(folded.attn.in_proj_weight[:8], w[:8])


class _MHA(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.attn = mha

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_fused_bf16_base_with_fp32_adapters():
    model = QKV(torch.bfloat16)
    gm = _fused(model, "qkv.weight", "auto")
    (site,) = lora_fx.sites(gm)
    assert site.lora_A.dtype == torch.float32
    x = torch.randn(3, IN, dtype=torch.bfloat16)
    y = gm(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[:, Q:Q + K], model(x)[:, Q:Q + K])
    ref = reference_call(model, gm, (x,), dtype=torch.float32)  # the same bf16 values in float32
    assert_close(y, ref, dtype=torch.bfloat16)


def test_gate_up_equal_split_and_rank_pattern():
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up = nn.Linear(6, 2 * 7)
            self.down = nn.Linear(7, 6)

        def forward(self, x):
            g, u = self.gate_up(x).chunk(2, -1)
            return self.down(F.silu(g) * u)

    model = MLP()
    gm = lora_fx.transform(model, rank=2, fused={"gate_up.weight": ("gate", "up")}, rank_pattern={"gate_up.*": 4})
    site = [s for s in lora_fx.sites(gm) if s.param == "gate_up.weight"][0]
    assert site.blocks == (("gate", 7, True), ("up", 7, True)) and site.rank == 4
    assert tuple(site.lora_A.shape) == (8, 6) and tuple(site.lora_B.shape) == (14, 4)
    for i, s in enumerate(lora_fx.sites(gm)):
        set_factors_(s, seed=20 + i)
    x = torch.randn(5, 6)
    assert_close(gm(x), reference_call(model, gm, (x,)))


def test_fused_state_dict_round_trip_and_sites():
    model = QKV()
    gm = _fused(model, "qkv.weight", "auto")
    sd = lora_fx.lora_state_dict(gm)
    assert set(sd) == {"qkv.lora.default.weight.lora_A", "qkv.lora.default.weight.lora_B"}
    other = lora_fx.transform(model, rank=3, alpha=5.0, fused={"qkv.weight": SPEC})
    other.load_state_dict(sd, strict=False)
    x = torch.randn(2, IN)
    assert torch.equal(other(x), gm(x))
    assert "blocks=q:10,k:4(off),v:4" in repr(lora_fx.sites(gm)[0].module)


def test_fused_config_round_trip_and_shortcuts():
    cfg = lora_fx.LoraConfig(fused={"a": SPEC, "b": ("x", "y"), "c": None, "d": FusedSpec(enable=("q",))})
    assert lora_fx.LoraConfig.from_json(cfg.to_json()) == cfg
    assert cfg.fused["b"] == FusedSpec(blocks=(("x", None), ("y", None)))
    assert cfg.fused["c"] is None


@pytest.mark.parametrize("spec, match", [
    ({"blocks": {"q": 10, "k": 4, "v": 5}}, "add up to 19"),
    ({"blocks": ("a", "b", "c", "d")}, "do not split equally"),
    ({"blocks": {"q": 10, "k": 4, "v": 4}, "enable": ("z",)}, "not blocks"),
    ({"enable": ("q",)}, "no default blocks"),
    ({"blocks": {"q": 10, "k": 4, "v": 4}, "enable": ()}, "enables no block"),
    ({"blockz": ("q",)}, "unknown key"),
])
def test_fused_errors_name_the_parameter_and_fix(spec, match):
    with pytest.raises(lora_fx.ConfigError, match=match):
        lora_fx.transform(QKV(), rank=2, fused={"qkv.weight": spec})


def test_fused_pattern_matching_nothing_is_an_error():
    with pytest.raises(lora_fx.TargetError, match="fused key"):
        lora_fx.transform(QKV(), rank=2, fused={"*.nothing": ("a", "b")})


@settings(max_examples=25, deadline=None, derandomize=True)
@given(sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data())
def test_fused_ops_match_reference_for_any_layout(sizes, data):
    """ops.merge / linear_delta / delta_weight with any block sizes and enabled subset (non-empty)."""
    on = data.draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes)).filter(any))
    r, fan_in = 2, 3
    g = torch.Generator().manual_seed(sum(sizes) * 7 + len(sizes))
    layout = tuple(zip(sizes, on))
    a = torch.randn(r * sum(on), fan_in, generator=g)
    b = torch.randn(sum(n for n, e in layout if e), r, generator=g)
    w = torch.randn(sum(sizes), fan_in, generator=g)
    s = torch.tensor(0.7)
    blocks = tuple((str(i), n, e) for i, (n, e) in enumerate(layout))
    ref = lora_weight(torch.zeros_like(w), a, b, 0.7, blocks)  # 0.7 · ΔW from the documented layout
    assert_close(ops.delta_weight(a, b, s, w.shape, layout), ref)
    merged = ops.merge(w, a, b, s, layout)
    assert_close(merged, lora_weight(w, a, b, 0.7, blocks))
    x = torch.randn(4, fan_in, generator=g)
    y = F.linear(x, w)
    out = ops.linear_delta(y, x, a, b, s, layout)
    assert_close(out, F.linear(x, w + ref))
    start = 0
    for n, e in layout:
        if not e:  # disabled blocks: bit-identical rows and features
            assert torch.equal(merged[start:start + n], w[start:start + n])
            assert torch.equal(out[:, start:start + n], y[:, start:start + n])
        start += n
