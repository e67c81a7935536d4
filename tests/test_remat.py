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

from _reference import randomize_, reference_call
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
EXPECTED = {"gate": "norm", "up": "norm", "down": "act_mul", "fc": "layer_norm", "out": "gelu", "head": "gelu"}


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
    assert_close(out, ref, dtype=dtype)
    if dtype == torch.float32:  # bf16 input grads through a norm's backward: see _same_as_plain
        assert_close(gx, rgx, dtype=dtype)


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
            assert_close(ga, ra, dtype=dtype)
            assert_close(gb, rb, dtype=dtype)
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
    _same_ops(o1, o2, g1, g2, gm, plain)


def _same_ops(o1, o2, g1, g2, gm, plain):
    """Remat recomputes the producer with the same kernels on the same values and feeds the same
    GEMMs: outputs bit for bit; gradients (bit-equal here) within a few roundings, since the
    recomputed input is a fresh buffer and a BLAS may pick another blocking (summation order) for
    it: 8 fp32 ulps of the largest value, or 1 ulp of a half dtype (an fp32-accumulated sum in
    another order still rounds to within one half-precision step)."""
    assert torch.equal(o1, o2)
    pairs = [(g1, g2)]
    for a, b in zip(lora_fx.sites(gm), lora_fx.sites(plain)):
        pairs += [(a.lora_A.grad, b.lora_A.grad), (a.lora_B.grad, b.lora_B.grad)]
    for got, want in pairs:
        assert got.dtype == want.dtype
        assert_close(got, want, ulps=8 if want.dtype in (torch.float32, torch.float64) else 1)


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
        assert_close(u, v, dtype=torch.float32)


def test_compiled_matches_eager():
    _, gm = _build("rms_norm")
    x = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(6))
    eo, eg = _run(gm, x)
    eA = [s.lora_A.grad.clone() for s in lora_fx.sites(gm)]
    for s in lora_fx.sites(gm):
        s.lora_A.grad = s.lora_B.grad = None
    co, cg = _run(torch.compile(gm, backend="aot_eager", fullgraph=True), x)
    assert_close(co, eo)
    assert_close(cg, eg)
    for s, g in zip(lora_fx.sites(gm), eA):
        assert_close(s.lora_A.grad, g)


def test_no_grad_and_frozen_input_paths():
    model, gm = _build("layer_norm")
    x = torch.randn(4, 12)
    with torch.no_grad():
        assert_close(gm(x), reference_call(model, gm, (x,)))
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
    _same_ops(o1, o2, g1, g2, gm, plain)


# ------------------------------------------------------------------------------------------------
# producers changed after capture: the recomputed input must be what ran


def _assert_matches(model, gm, x):
    """Output and adapter grads of ``gm`` equal the functional reference's, on clones of ``x``."""
    params = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    out = gm(x.clone())
    ref = reference_call(model, gm, (x.clone(),))
    assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        assert_close(a, b)


class _InplaceAfterProducer(nn.Module):
    """``h = gelu(u); h.relu_(); fc(h)``: the graph feeds the gelu node to fc, whose value was then
    changed in place; recomputing gelu(u) in backward would miss the relu_."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.ln, self.fc = nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, u):
        if self.mode == "gelu_relu_":
            h = F.gelu(u)
            h.relu_()
        else:  # "ln_add_"
            h = self.ln(u)
            h.add_(2.0)
        return self.fc(h)


@pytest.mark.parametrize("mode", ["gelu_relu_", "ln_add_"])
def test_remat_producer_output_modified_in_place_before_site(mode):
    model = _InplaceAfterProducer(mode)
    gm = randomize_(lora_fx.transform(model, rank=2))
    _assert_matches(model, gm, torch.randn(5, 4, requires_grad=True))


class _MutatedInput(nn.Module):
    """The producer's input (which needs no grad, so nothing guards it) is modified in place."""

    def __init__(self, before_site):
        super().__init__()
        self.before_site = before_site
        self.fc = nn.Linear(4, 3)

    def forward(self, u):
        h = F.gelu(u)
        if self.before_site:
            u.mul_(3.0)
            return self.fc(h)
        y = self.fc(h)
        u.add_(1.0)
        return y


@pytest.mark.parametrize("before_site", [True, False])
def test_remat_producer_input_modified_in_place(before_site):
    # before: remat recomputed gelu(3u) -> wrong lora_A grad; after: backward raised "modified by an
    # inplace operation" although the plain form (keeping x) is fine
    model = _MutatedInput(before_site)
    gm = randomize_(lora_fx.transform(model, rank=2))
    _assert_matches(model, gm, torch.randn(5, 4))


class _GradInputWrittenInPlace(nn.Module):
    """``h = producer(u)`` with ``u`` needing a gradient, then ``u`` written in place (directly or
    through a view) before the site: recomputing ``producer(u)`` in backward would read the new
    value, and ``autograd.grad`` on the adapters alone never reaches the producer's own check."""

    def __init__(self, producer, write):
        super().__init__()
        self.pre, self.a, self.ln = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)
        self.producer, self.write = producer, write

    def forward(self, x):
        u = self.pre(x)
        h = F.gelu(u) if self.producer == "gelu" else self.ln(u)
        if self.write == "method":
            u.sin_()
        elif self.write == "view":
            u.view(-1).mul_(2.0)
        else:
            u += 1.0
        return self.a(h) + u


@pytest.mark.parametrize("producer", ["gelu", "layernorm"])
@pytest.mark.parametrize("write", ["method", "view", "augmented"])
@pytest.mark.parametrize("rows", [32, 2], ids=["merged", "factored"])
def test_a_producer_input_written_in_place_before_the_site_is_not_recomputed(producer, write, rows):
    torch.manual_seed(0)
    model = _GradInputWrittenInPlace(producer, write)
    gm = randomize_(lora_fx.transform(model, rank=2, targets=["a.weight"]))
    _assert_matches(model, gm, torch.randn(rows, 8, requires_grad=True))


class _LnFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.act, self.fc, self.out = nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, u):
        return self.out(self.act(self.fc(self.ln(u))))


@pytest.mark.parametrize("change", ["hook", "eps", "approximate", "swap"])
def test_remat_leaf_producer_changed_after_transform(change):
    """A leaf producer changed after transform (a forward hook, eps, GELU mode, another module):
    the recomputed input must be what the leaf returned at run time, not what it was at transform."""
    model = _LnFc()
    gm = randomize_(lora_fx.transform(model, rank=2))
    for m in (model, gm):
        if change == "hook":
            m.ln.register_forward_hook(lambda mod, args, out: out * 3)
        elif change == "eps":
            m.ln.eps = 10.0
        elif change == "approximate":
            m.act.approximate = "tanh"
        else:
            m.ln = nn.Identity()
    _assert_matches(model, gm, torch.randn(5, 4, requires_grad=True))


def test_delete_adapter_leaves_no_dead_remat_nodes():
    gm = lora_fx.transform(_LnFc(), rank=2)
    lora_fx.delete_adapter(gm, "default")
    assert [n.op for n in gm.graph.nodes if n.op == "get_attr"] == []


def test_remat_under_torch_func_transforms():
    """torch.func.grad / vmap (per-sample gradients) / jacrev raised "autograd.Function ... must
    override the setup_context staticmethod" with recomputation on (the default)."""
    from torch.func import functional_call, grad, jacrev, vmap

    model = _LnFc()
    x = torch.randn(4, 2, 4)
    res = []
    for recompute in (True, False):
        gm = randomize_(lora_fx.transform(model, rank=2, recompute_inputs=recompute), seed=2)
        params = {k: v.detach() for k, v in gm.named_parameters() if v.requires_grad}

        def loss(p, xi):
            return functional_call(gm, p, (xi,)).square().sum()

        res.append((grad(loss)(params, x), vmap(grad(loss), in_dims=(None, 0))(params, x),
                    jacrev(lambda xi: gm(xi).sum())(x)))
    assert_close(res[0], res[1])


def test_remat_under_forward_mode_ad():
    """forward-mode AD (dual tensors) raised "You must implement the jvp function" with
    recomputation on, where the plain form works."""
    import torch.autograd.forward_ad as fwAD

    model = _LnFc()
    x, t = torch.randn(2, 4), torch.randn(2, 4)
    res = []
    for recompute in (True, False):
        gm = randomize_(lora_fx.transform(model, rank=2, recompute_inputs=recompute), seed=2)
        with fwAD.dual_level():
            out = gm(fwAD.make_dual(x.clone().requires_grad_(), t))
            res.append(tuple(fwAD.unpack_dual(out))[:2])
    assert_close(res[0], res[1])
