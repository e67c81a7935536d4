"""nn.MultiheadAttention, F.multi_head_attention_forward and torch.nn transformer modules as LoRA
sites, against a hand-built reference MHA whose weights the test sets to ``W + ΔW``."""

from __future__ import annotations

import copy
import itertools
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from _reference import factor_grads, reference_model, set_factors_
from _tolerance import assert_close

E, H, L, S, N = 16, 4, 5, 7, 2
KDIM, VDIM = 12, 10


class Attn(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, **kw)

    def forward(self, q, k, v, need_weights: bool, average_attn_weights: bool):
        return self.attn(q, k, v, need_weights=need_weights, average_attn_weights=average_attn_weights)


def _adapted(model, **kw):
    gm = lora_fx.transform(model, rank=2, alpha=3.0, **kw)
    for i, s in enumerate(lora_fx.sites(gm)):
        set_factors_(s, seed=i)
    return gm


def _reference(model, gm):
    """The reference MHA: a copy of ``model`` with every adapted weight set to ``W + ΔW``
    (tests/_reference.py), all parameters trainable (dL/dW' gives the factor gradients)."""
    return reference_model(model, gm).requires_grad_(True)


def _inputs(packed, batch_first, self_attn=False):
    def t(length, dim):
        shape = (N, length, dim) if batch_first else (length, N, dim)
        return torch.randn(shape, requires_grad=True)
    q = t(L, E)
    if self_attn:
        return q, q, q
    return q, t(S, E if packed else KDIM), t(S, E if packed else VDIM)


def _loss(out, weights):
    g = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    if weights is not None:
        loss = loss + (weights * torch.randn(weights.shape, generator=g)).sum()
    return loss


def _close(a, b, what, dtype=torch.float32):
    assert (a is None) == (b is None), what
    if a is not None:
        assert_close(a, b, dtype=dtype, msg=what)


MHA_CONFIGS = [dict(packed=p, bias=b, add_bias_kv=kv, add_zero_attn=z, batch_first=bf)
               for p, b, kv, z, bf in itertools.product((True, False), repeat=5)]


@pytest.mark.parametrize("cfg", MHA_CONFIGS, ids=lambda c: "-".join(k for k, v in c.items() if v) or "plain")
def test_mha_every_configuration_matches_reference(cfg):
    cfg = dict(cfg)
    packed = cfg.pop("packed")
    extra = {} if packed else dict(kdim=KDIM, vdim=VDIM)
    model = Attn(**cfg, **extra)
    gm = _adapted(model)
    names = {s.param for s in lora_fx.sites(gm)}
    expected = {"attn.in_proj_weight"} if packed else {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"}
    assert names == expected | {"attn.out_proj.weight"}
    if packed:  # in_proj_weight is q, k, v blocks with their own factors by default
        (site,) = [s for s in lora_fx.sites(gm) if s.param == "attn.in_proj_weight"]
        assert site.blocks == (("q", E, True), ("k", E, True), ("v", E, True))
        assert tuple(site.lora_A.shape) == (3 * 2, E) and tuple(site.lora_B.shape) == (3 * E, 2)
    # the adapted MHA keeps every attribute of the original
    plain = {k: v for k, v in vars(model.attn).items() if not k.startswith("_") or k == "_qkv_same_embed_dim"}
    for k, v in plain.items():
        if not isinstance(v, (dict, torch.Tensor)):
            assert getattr(gm.attn, k) == v, k
    ref = _reference(model, gm)
    keys = set(gm.state_dict())
    sites = lora_fx.sites(gm)
    for train, need_weights, avg in itertools.product((True, False), repeat=3):
        gm.train(train)
        ref.train(train)
        torch.manual_seed(1)
        q, k, v = _inputs(packed, cfg["batch_first"])
        out, w = gm(q, k, v, need_weights, avg)
        loss = _loss(out, w)
        for s in sites:
            s.lora_A.grad = s.lora_B.grad = None
        loss.backward()
        got_in = [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        ref.zero_grad()
        rout, rw = ref.attn(q, k, v, need_weights=need_weights, average_attn_weights=avg)
        _loss(rout, rw).backward()
        tag = f"train={train} need_weights={need_weights} avg={avg}"
        _close(out, rout, f"output {tag}")
        _close(w, rw, f"attention weights {tag}")
        for a, b, n in zip(got_in, (q.grad, k.grad, v.grad), "qkv"):
            _close(a, b, f"d{n} {tag}")
        for s in sites:
            da, db = factor_grads(s, ref.get_parameter(s.param).grad)
            assert s.lora_A.grad.abs().sum() > 0 and s.lora_B.grad.abs().sum() > 0, s.param
            _close(s.lora_A.grad, da, f"dA {s.param} {tag}")
            _close(s.lora_B.grad, db, f"dB {s.param} {tag}")
        # no_grad and inference_mode (eval + no_grad can take PyTorch's fused fast path)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                q2, k2, v2 = (t.detach() for t in (q, k, v))
                out2, w2 = gm(q2, k2, v2, need_weights, avg)
                rout2, rw2 = ref.attn(q2, k2, v2, need_weights=need_weights, average_attn_weights=avg)
            _close(out2, rout2, f"output {tag} {ctx.__name__}")
            _close(w2, rw2, f"weights {tag} {ctx.__name__}")
        assert set(gm.state_dict()) == keys
    # strict reload after forwards, into itself and into a fresh transform of the same model
    gm.load_state_dict(gm.state_dict(), strict=True)
    fresh = lora_fx.transform(model, rank=2, alpha=3.0)
    fresh.load_state_dict(gm.state_dict(), strict=True)
    # fold: same outputs; plain state dict loads strictly into the original class
    folded = lora_fx.fold(gm).eval()
    ref.eval()
    plain_model = copy.deepcopy(model)
    plain_model.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        q, k, v = _inputs(packed, cfg["batch_first"])
        rout, rw = ref.attn(q, k, v, need_weights=True, average_attn_weights=False)
        for mod in (folded, plain_model):
            fout, fw = mod(q, k, v, True, False)
            _close(fout, rout, "folded output")
            _close(fw, rw, "folded weights")


def _profiled_ops(fn) -> set[str]:
    """Names of the Python and builtin (C) functions ``fn`` calls (``sys.setprofile``)."""
    names: set[str] = set()

    def hook(frame, event, arg):
        names.add(getattr(arg, "__name__", "") if event == "c_call" else frame.f_code.co_name)

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return names


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_mha_fast_path_is_taken_and_exact(ctx):
    model = Attn(batch_first=True).eval()
    gm = _adapted(model).eval()
    ref = _reference(model, gm).eval()
    x = torch.randn(N, L, E)
    with ctx():
        ops_gm = _profiled_ops(lambda: gm(x, x, x, False, True))
        ops_ref = _profiled_ops(lambda: ref(x, x, x, False, True))
        out, _ = gm(x, x, x, False, True)
        rout, _ = ref(x, x, x, False, True)
    for names in (ops_ref, ops_gm):  # the adapted MHA takes the same fused kernel as an unadapted one
        assert "_native_multi_head_attention" in names and "multi_head_attention_forward" not in names
    with ctx():  # and the slow path where PyTorch takes it (need_weights with non-self attention)
        assert "multi_head_attention_forward" in _profiled_ops(lambda: gm(x, x + 1, x, True, True))
    _close(out, rout, "fast-path output")


def test_mha_bf16_matches_reference():
    model = Attn(batch_first=True).to(torch.bfloat16)
    gm = _adapted(model)
    assert all(s.lora_A.dtype == torch.float32 for s in lora_fx.sites(gm))
    ref = _reference(model, gm)
    x = torch.randn(N, L, E, dtype=torch.bfloat16)
    out, w = gm(x, x, x, True, True)
    rout, rw = ref(x, x, x, True, True)
    assert out.dtype == torch.bfloat16
    _close(out, rout, "bf16 output", dtype=torch.bfloat16)
    _close(w, rw, "bf16 weights", dtype=torch.bfloat16)


def test_mha_targets_by_glob_and_fused_enable():
    model = Attn()
    gm = lora_fx.transform(model, rank=2, targets=["*.in_proj_weight"], fused={"*.in_proj_weight": {"enable": ("q", "v")}})
    (site,) = lora_fx.sites(gm)
    assert site.param == "attn.in_proj_weight" and site.blocks == (("q", E, True), ("k", E, False), ("v", E, True))
    gm2 = lora_fx.transform(model, rank=2, targets=["*.out_proj.weight"])
    assert [s.param for s in lora_fx.sites(gm2)] == ["attn.out_proj.weight"]
    gm3 = lora_fx.transform(model, rank=2, fused={"*.in_proj_weight": None})
    plain = [s for s in lora_fx.sites(gm3) if s.param == "attn.in_proj_weight"][0]
    assert plain.blocks == () and tuple(plain.lora_A.shape) == (2, E) and tuple(plain.lora_B.shape) == (3 * E, 2)


class FunctionalAttn(nn.Module):
    """Calls F.multi_head_attention_forward directly with module parameters."""

    def __init__(self, separate: bool):
        super().__init__()
        self.separate = separate
        self.attn = nn.MultiheadAttention(E, H, kdim=KDIM if separate else None, vdim=VDIM if separate else None)

    def forward(self, q, k, v):
        a = self.attn
        if self.separate:
            return F.multi_head_attention_forward(
                q, k, v, E, H, None, a.in_proj_bias, None, None, False, 0.0, a.out_proj.weight, a.out_proj.bias,
                training=self.training, need_weights=True, use_separate_proj_weight=True,
                q_proj_weight=a.q_proj_weight, k_proj_weight=a.k_proj_weight, v_proj_weight=a.v_proj_weight)
        return F.multi_head_attention_forward(
            q, k, v, E, H, a.in_proj_weight, a.in_proj_bias, None, None, False, 0.0, a.out_proj.weight,
            a.out_proj.bias, training=self.training, need_weights=True)


@pytest.mark.parametrize("separate", [False, True])
def test_functional_mha_forward_site(separate):
    model = FunctionalAttn(separate)
    gm = _adapted(model)
    sites = lora_fx.sites(gm)
    assert all(s.op == "mha" for s in sites)
    expected = {"attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight"} if separate else {"attn.in_proj_weight"}
    assert {s.param for s in sites} == expected | {"attn.out_proj.weight"}
    if not separate:
        assert [s.blocks for s in sites if s.param == "attn.in_proj_weight"][0][1] == ("k", E, True)
    ref = _reference(model, gm)
    q, k, v = _inputs(not separate, False)
    out, w = gm(q, k, v)
    _loss(out, w).backward()
    got = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    rout, rw = ref(q, k, v)
    _loss(rout, rw).backward()
    _close(out, rout, "output")
    _close(w, rw, "weights")
    for a, b in zip(got, (q.grad, k.grad, v.grad)):
        _close(a, b, "input grad")
    for s in sites:
        da, db = factor_grads(s, ref.get_parameter(s.param).grad)
        _close(s.lora_A.grad, da, f"dA {s.param}")
        _close(s.lora_B.grad, db, f"dB {s.param}")
    folded = lora_fx.fold(gm)
    with torch.no_grad():
        _close(folded(q, k, v)[0], rout, "folded output")


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.layer(x))


def _check_end_to_end(model, gm, inputs):
    ref = _reference(model, gm)
    keys = set(gm.state_dict())
    out = gm(*inputs)
    loss = _loss(out, None)
    loss.backward()
    ref_out = ref(*inputs)
    _loss(ref_out, None).backward()
    _close(out, ref_out, "output")
    for s in lora_fx.sites(gm):
        assert s.lora_A.grad.abs().sum() > 0 and s.lora_B.grad.abs().sum() > 0, s.param
        da, db = factor_grads(s, ref.get_parameter(s.param).grad)
        _close(s.lora_A.grad, da, f"dA {s.param}")
        _close(s.lora_B.grad, db, f"dB {s.param}")
    assert set(gm.state_dict()) == keys
    gm.load_state_dict(gm.state_dict(), strict=True)
    gm.eval()
    ref.eval()
    with torch.no_grad():  # eval + no_grad: the encoder layer's own fused fast path
        _close(gm(*inputs), ref(*inputs), "eval no_grad output")
        _close(lora_fx.fold(gm)(*inputs), ref(*inputs), "folded output")


def test_transformer_encoder_layer_end_to_end():
    model = Encoder()
    gm = _adapted(model)
    names = {s.param for s in lora_fx.sites(gm)}
    assert names == {"layer.self_attn.in_proj_weight", "layer.self_attn.out_proj.weight", "layer.linear1.weight",
                     "layer.linear2.weight", "head.weight"}
    _check_end_to_end(model, gm, (torch.randn(N, L, E),))


class Seq2Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.t = nn.Transformer(E, H, 1, 1, 24, dropout=0.0, batch_first=True)

    def forward(self, src, tgt):
        return self.t(src, tgt)


def test_transformer_end_to_end_one_adapter_per_weight_with_overlapping_patterns():
    model = Seq2Seq()
    pats = ["*.out_proj.weight", "*self_attn*", "t.encoder.*", "*", "t.decoder.layers.0.multihead_attn.out_proj.weight"]
    gm = lora_fx.transform(model, rank=2, alpha=3.0, targets=pats)
    for i, s in enumerate(lora_fx.sites(gm)):
        set_factors_(s, seed=i)
    weights = {n for n, p in model.named_parameters() if p.ndim >= 2}
    sites = lora_fx.sites(gm)
    assert sorted(s.param for s in sites) == sorted(weights)  # once each
    n_adapters = sum(isinstance(m, lora_fx.LoraAdapter) for m in gm.modules())
    assert n_adapters == len(weights)
    assert any(s.param.endswith("multihead_attn.out_proj.weight") for s in sites)
    _check_end_to_end(model, gm, (torch.randn(N, S, E), torch.randn(N, L, E)))


@pytest.mark.parametrize("train", [True, False])
def test_mha_torch_export_unfolded_and_folded(train):
    model = Attn(batch_first=True)
    gm = _adapted(model).train(train)
    ref = _reference(model, gm).train(train)
    x = torch.randn(N, L, E)
    with torch.no_grad():
        expected = ref(x, x, x, True, True)
    for mod in (gm, lora_fx.fold(gm).train(train)):
        ep = torch.export.export(mod, (x, x, x, True, True))
        with torch.no_grad():
            got = ep.module()(x, x, x, True, True)
        _close(got[0], expected[0], "exported output")
        _close(got[1], expected[1], "exported weights")


class MaskedAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)

    def forward(self, x, key_padding_mask, attn_mask):
        return self.attn(x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_weights=False)[0]


class MaskedEncoder(nn.Module):
    """nn.TransformerEncoder: in eval + no_grad with a padding mask PyTorch runs it on nested tensors."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, 24, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)

    def forward(self, x, key_padding_mask):
        return self.enc(x, src_key_padding_mask=key_padding_mask)


def test_masks_and_nested_tensor_fast_paths():
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    x = torch.randn(N, L, E)
    for model, args in ((MaskedAttn(), (x, pad, causal)), (MaskedAttn(), (x, pad, None)), (MaskedEncoder(), (x, pad))):
        gm = _adapted(model)
        assert len(lora_fx.sites(gm)) == (2 if isinstance(model, MaskedAttn) else 8)
        ref = _reference(model, gm)
        for train in (True, False):
            gm.train(train)
            ref.train(train)
            _close(gm(*args), ref(*args), f"{type(model).__name__} train={train}")
            with torch.no_grad():
                _close(gm(*args), ref(*args), f"{type(model).__name__} train={train} no_grad")
