"""Adapter-input rematerialisation (lora_fx/remat.py, passes/remat.py): a factored linear site whose
input comes from gelu / silu / layer_norm / rms_norm / a*b keeps the producer's inputs instead of
its own input and recomputes it in backward.  Outputs and gradients must equal the independent
functional reference; the saved activations must shrink."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import ops

from _ref_core import randomize_, reference_call, tol
from _tolerance import assert_close


class GatedBlock(nn.Module):
    """Llama-style gated MLP after a norm leaf, then a functional layer_norm and a GELU leaf."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.gate, self.up, self.down = nn.Linear(12, 20), nn.Linear(12, 20), nn.Linear(20, 12)
        self.fc, self.act, self.out = nn.Linear(12, 24), nn.GELU(approximate="tanh"), nn.Linear(24, 7)
        self.head = nn.Linear(7, 5, bias=False)

    def forward(self, x):
        h = self.norm(x)
        y = self.down(F.silu(self.gate(h)) * self.up(h)) + x
        z = self.out(self.act(self.fc(F.layer_norm(y, (12,)))))
        return self.head(F.gelu(z))


NORMS = {"layer_norm": lambda: nn.LayerNorm(12), "rms_norm": lambda: nn.RMSNorm(12, eps=1e-6)}
EXPECTED = {"gate": "norm", "up": "norm", "down": "mul", "fc": "layer_norm", "out": "gelu", "head": "gelu"}


def _build(norm="layer_norm", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = GatedBlock(NORMS[norm]()).to(dtype)
    with torch.no_grad():  # non-trivial norm affine parameters
        for p in model.norm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    gm = randomize_(lora_fx.transform(model, rank=3, alpha=5, **kw))
    return model, gm


def _remat_kinds(gm):
    out = {}
    for n in gm.graph.nodes:
        if n.target is ops.linear_delta:
            out[n.args[0].target] = (n.kwargs.get("remat") or (None,))[0]
    return out


def _strip_remat(gm):
    for n in gm.graph.nodes:
        if n.target is ops.linear_delta and "remat" in n.kwargs:
            n.kwargs = {}
    gm.recompile()
    return gm


def _run(fn, x):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    (out.float() * w.float()).sum().backward()
    return out, x.grad


def _check(model, gm, x, dtype, ctx=None):
    ctx = ctx or torch.enable_grad
    with ctx():
        out, gx = _run(gm, x)
    with ctx():
        ref, rgx = _run(lambda xx: reference_call(model, gm, (xx,)), x)
    _close(out, ref, dtype)
    if dtype == torch.float32:  # bf16 input grads through a norm's backward: see _same_as_plain
        _close(gx, rgx, dtype)


def _close(a, b, dtype):
    """Within a few roundings of the largest magnitude in ``dtype`` (tests/_tolerance.py)."""
    assert_close(a, b, dtype=dtype)


def _factor_grads(model, gm, x, ctx=None):
    """A/B grads of gm vs the reference's grads w.r.t. the same factors."""
    ctx = ctx or torch.enable_grad
    sites = lora_fx.sites(gm)
    for s in sites:
        s.lora_A.grad = s.lora_B.grad = None
    with ctx():
        _run(gm, x)
    got = [(s.lora_A.grad.clone(), s.lora_B.grad.clone()) for s in sites]
    for s in sites:
        s.lora_A.grad = s.lora_B.grad = None
    with ctx():
        _run(lambda xx: reference_call(model, gm, (xx,)), x)
    ref = [(s.lora_A.grad, s.lora_B.grad) for s in sites]
    return got, ref


def test_specs_are_attached_to_the_right_sites():
    for norm in NORMS:
        _, gm = _build(norm)
        kinds = _remat_kinds(gm)
        want = {k: (norm if v == "norm" else v) for k, v in EXPECTED.items()}
        assert kinds == want, kinds


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_outputs_and_grads_match_functional_reference(norm, dtype, mode):
    model, gm = _build(norm, dtype)
    getattr(gm, mode)()
    model.train(mode == "train")
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    _check(model, gm, x, dtype)
    if dtype == torch.float32:
        got, ref = _factor_grads(model, gm, x)
        for (ga, gb), (ra, rb) in zip(got, ref):
            _close(ga, ra, dtype)
            _close(gb, rb, dtype)
    else:  # bf16 factor grads: the reference differentiates through a rounded fp32 merge; compare
        _same_as_plain(norm, dtype, x, mode)  # with the same ops without remat instead


def _same_as_plain(norm, dtype, x, mode="train", ctx=torch.enable_grad, **kw):
    """Remat vs the same graph with the remat specs removed: same forward ops, same GEMMs."""
    _, gm = _build(norm, dtype, **kw)
    _, plain = _build(norm, dtype, **kw)
    _strip_remat(plain)
    for m in (gm, plain):
        getattr(m, mode)()
    with ctx():
        o1, g1 = _run(gm, x)
        o2, g2 = _run(plain, x)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)
    for a, b in zip(lora_fx.sites(gm), lora_fx.sites(plain)):
        assert a.lora_A.grad.dtype == b.lora_A.grad.dtype
        torch.testing.assert_close(a.lora_A.grad, b.lora_A.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.lora_B.grad, b.lora_B.grad, rtol=1e-5, atol=1e-6)


def test_same_values_as_without_remat_fp32_and_fp32_adapters_on_bf16():
    x = torch.randn(3, 12, generator=torch.Generator().manual_seed(2))
    _same_as_plain("layer_norm", torch.float32, x)
    _same_as_plain("rms_norm", torch.bfloat16, x.bfloat16(), adapter_dtype=torch.float32)


def test_autocast_bf16_matches_reference_under_autocast():
    model, gm = _build("layer_norm")
    x = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(4))
    ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    _check(model, gm, x, torch.bfloat16, ctx)
    _same_as_plain("layer_norm", torch.float32, x, ctx=ctx)


def _saved_bytes(gm, x):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in gm.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gm(x.requires_grad_(True)).sum().backward()
    return sum(v for k, v in seen.items() if k not in params)


def test_saved_activations_shrink():
    _, gm = _build("layer_norm")
    _, plain = _build("layer_norm")
    _strip_remat(plain)
    x = torch.randn(16, 12)
    with_remat, without = _saved_bytes(gm, x.clone()), _saved_bytes(plain, x.clone())
    # each of the 6 sites' inputs (16 x {12,12,20,12,24,7} fp32) is no longer kept
    assert without - with_remat >= 16 * 4 * (12 + 20 + 12 + 24 + 7), (with_remat, without)


def test_second_derivatives_match_reference():
    model, gm = _build("layer_norm")
    x = torch.randn(2, 12, generator=torch.Generator().manual_seed(5), requires_grad=True)

    def gradnorm(fn):
        (g,) = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        return g.pow(2).sum()

    sites = lora_fx.sites(gm)
    a = torch.autograd.grad(gradnorm(gm), [s.lora_A for s in sites])
    b = torch.autograd.grad(gradnorm(lambda xx: reference_call(model, gm, (xx,))), [s.lora_A for s in sites])
    for u, v in zip(a, b):  # values up to ~1e3: fp32 tolerance relative to the largest
        torch.testing.assert_close(u, v, rtol=0, atol=1e-4 * float(v.abs().max()))


def test_compiled_matches_eager():
    _, gm = _build("rms_norm")
    x = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(6))
    eo, eg = _run(gm, x)
    eA = [s.lora_A.grad.clone() for s in lora_fx.sites(gm)]
    for s in lora_fx.sites(gm):
        s.lora_A.grad = s.lora_B.grad = None
    co, cg = _run(torch.compile(gm, backend="aot_eager", fullgraph=True), x)
    torch.testing.assert_close(co, eo, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cg, eg, rtol=1e-5, atol=1e-6)
    for s, g in zip(lora_fx.sites(gm), eA):
        torch.testing.assert_close(s.lora_A.grad, g, rtol=1e-5, atol=1e-6)


def test_no_grad_and_frozen_input_paths():
    model, gm = _build("layer_norm")
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference_call(model, gm, (x,)), **tol(torch.float32))
    lora_fx.mark_only_lora_as_trainable(gm)
    gm(x).sum().backward()  # input needs no grad: only the factors do
    assert all(s.lora_A.grad is not None for s in lora_fx.sites(gm))


def test_mul_with_a_constant_side_keeps_input():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mask", torch.rand(12))
            self.lin = nn.Linear(12, 6)

        def forward(self, x):
            return self.lin(x * self.mask)

    torch.manual_seed(0)
    model = M()
    gm = randomize_(lora_fx.transform(model, rank=2))
    x = torch.randn(3, 12)
    _check(model, gm, x, torch.float32)


def test_modifying_a_kept_input_in_place_is_caught():
    _, gm = _build("layer_norm")
    gm.eval()
    x = torch.randn(2, 12, requires_grad=True)
    out = gm(x)
    with torch.no_grad():
        gm.norm.weight.mul_(2)  # the recompute would see other values
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_recompute_inputs_false_keeps_inputs_and_is_validated():
    torch.manual_seed(0)
    model = GatedBlock(nn.LayerNorm(12))
    gm = lora_fx.transform(model, rank=2, recompute_inputs=False)
    assert set(_remat_kinds(gm).values()) == {None}
    cfg = lora_fx.LoraConfig.from_json(lora_fx.LoraConfig(recompute_inputs=False).to_json())
    assert cfg.recompute_inputs is False
    with pytest.raises(lora_fx.ConfigError, match="recompute_inputs"):
        lora_fx.transform(model, rank=2, recompute_inputs="yes")
    # dropout on the adapter branch: its input is the dropout's output, nothing to recompute
    assert set(_remat_kinds(lora_fx.transform(model, rank=2, dropout=0.1)).values()) == {None}


def test_fused_blocks_site_with_recomputation_matches_reference():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.qkv = nn.LayerNorm(8), nn.Linear(8, 12)

        def forward(self, x):
            q, k, v = self.qkv(self.ln(x)).split(4, dim=-1)
            return q * k + v

    torch.manual_seed(0)
    model = Attn()
    fused = {"qkv.weight": {"blocks": {"q": 4, "k": 4, "v": 4}, "enable": ("q", "v")}}
    gm, plain = (randomize_(lora_fx.transform(model, rank=2, fused=fused)) for _ in range(2))
    _strip_remat(plain)
    assert _remat_kinds(gm) == {"qkv": "layer_norm"} and _remat_kinds(plain) == {"qkv": None}
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(8))
    o1, g1 = _run(gm, x)
    o2, g2 = _run(plain, x)  # the fused form itself is checked against its reference in test_fused.py
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=1e-6)
    for a, b in zip(lora_fx.sites(gm), lora_fx.sites(plain)):
        torch.testing.assert_close(a.lora_A.grad, b.lora_A.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.lora_B.grad, b.lora_B.grad, rtol=1e-5, atol=1e-6)
