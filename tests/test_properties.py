"""Property tests: random small models from a grammar, checked against an independent reference.

Grammar: an optional embedding front (optionally tied to a final head), then 1-5 steps drawn from
Linear, functional ``F.linear`` on an own parameter, ``x @ W``, Conv1d, Conv2d, MultiheadAttention,
activations, residual blocks, a weight tied to an earlier step's weight and a module called twice;
steps live either as attributes (one flat graph) or in an ``nn.ModuleList`` (each step its own
traced GraphModule).  For every model and configuration:

* ``B = 0`` (fresh adapters) ⇒ the output equals the model's, bit for bit;
* random non-zero ``A, B`` ⇒ output and gradients equal
  ``torch.func.functional_call(model, {name: W + s·(B@A).reshape(W.shape)})``;
* ``fold(gm)`` ≡ ``gm``, and its state dict loads ``strict=True`` into the original model;
* ``save_lora_state`` / ``load_lora_state`` round trip is exact;
* the user's model is never modified.

Profiles (tests/conftest.py): ``default`` 200 examples, derandomized; ``--hypothesis-profile=thorough``
2,000 random examples.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lora_fx
from lora_fx.io import load_lora_state, save_lora_state
from _checks import assert_unchanged, snapshot
from _reference import leaf_factors, randomize_, reference_call
from _tolerance import assert_close

ACTS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}
KINDS = ("linear", "flinear", "matmul", "conv1d", "conv2d", "mha", "act", "residual", "tied", "reuse")


@dataclass
class StepSpec:
    kind: str
    d_out: int
    bias: bool
    k: int = 1
    groups: int = 1
    heads: int = 1
    act: str = "relu"
    ref: int = 0  # index of an earlier step (tied / reuse)


class Step(nn.Module):
    """One grammar step on ``h: (B, T, d_in)`` → ``(B, T, d_out)``."""

    def __init__(self, spec: StepSpec, d_in: int, earlier: list["Step"]):
        super().__init__()
        self.kind, self.act = spec.kind, spec.act
        d_out = spec.d_out
        if spec.kind == "linear":
            self.lin = nn.Linear(d_in, d_out, bias=spec.bias)
        elif spec.kind == "flinear":
            self.weight = nn.Parameter(torch.randn(d_out, d_in) / math.sqrt(d_in))
            self.bias = nn.Parameter(torch.randn(d_out) * 0.1) if spec.bias else None
        elif spec.kind == "matmul":
            self.weight = nn.Parameter(torch.randn(d_in, d_out) / math.sqrt(d_in))
        elif spec.kind == "conv1d":
            self.conv = nn.Conv1d(d_in, d_out, spec.k, padding=spec.k // 2, groups=spec.groups, bias=spec.bias)
        elif spec.kind == "conv2d":
            self.conv = nn.Conv2d(d_in, d_out, spec.k, padding=spec.k // 2, groups=spec.groups, bias=spec.bias)
        elif spec.kind == "mha":
            self.mha = nn.MultiheadAttention(d_in, spec.heads, bias=spec.bias, batch_first=True)
        elif spec.kind == "residual":
            self.lin = nn.Linear(d_in, d_in, bias=spec.bias)
        elif spec.kind == "tied":  # F.linear on the very Parameter object of an earlier step
            self.weight = earlier[spec.ref].lin.weight
        elif spec.kind == "reuse":  # the same nn.Linear module called a second time
            self.lin = earlier[spec.ref].lin

    def forward(self, h):
        k = self.kind
        if k in ("linear", "reuse"):
            return self.lin(h)
        if k == "flinear":
            return F.linear(h, self.weight, self.bias)
        if k == "tied":
            return F.linear(h, self.weight)
        if k == "matmul":
            return h @ self.weight
        if k == "conv1d":
            return self.conv(h.transpose(1, 2)).transpose(1, 2)
        if k == "conv2d":
            return self.conv(h.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        if k == "mha":
            return self.mha(h, h, h, need_weights=False)[0]
        if k == "act":
            return ACTS[self.act](h)
        if k == "residual":
            return h + ACTS[self.act](self.lin(h))
        raise AssertionError(k)


class Net(nn.Module):
    def __init__(self, d0: int, vocab: int, padding_idx, specs: list[StepSpec], *, blocks: bool, tie_head: bool,
                 freq: bool = False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d0, padding_idx=padding_idx, scale_grad_by_freq=freq) if vocab else None
        steps: list[Step] = []
        d = d0
        for spec in specs:
            steps.append(Step(spec, d, steps))
            d = spec.d_out
        self.tie_head = tie_head
        self.n = len(steps)
        if blocks:
            self.layers = nn.ModuleList(steps)
        else:
            self.layers = None
            for i, s in enumerate(steps):
                self.add_module(f"s{i}", s)

    def forward(self, x):
        h = self.emb(x) if self.emb is not None else x
        for i in range(self.n):
            h = (self.layers[i] if self.layers is not None else getattr(self, f"s{i}"))(h)
        if self.tie_head:
            h = F.linear(h, self.emb.weight)
        return h


@st.composite
def models(draw):
    d0 = draw(st.integers(2, 6))
    vocab = draw(st.sampled_from([0, 0, 5, 7]))
    padding_idx = draw(st.sampled_from([None, 0, -1])) if vocab else None
    freq = bool(vocab) and draw(st.integers(0, 3)) == 0
    n = draw(st.integers(1, 4))
    specs, d, lins = [], d0, []  # lins: (index, d_in, d_out) of steps owning .lin
    for i in range(n):
        kind = draw(st.sampled_from(KINDS))
        bias = draw(st.booleans())
        act = draw(st.sampled_from(sorted(ACTS)))
        if kind in ("tied", "reuse"):
            fits = [j for j, din, dout in lins if (kind == "tied" and din == d) or (din == d and dout == d)]
            if not fits:
                kind = "linear"
            else:
                j = draw(st.sampled_from(fits))
                d_out = next(dout for jj, _, dout in lins if jj == j)
                specs.append(StepSpec(kind, d_out, bias, ref=j))
                d = d_out
                continue
        if kind in ("act", "residual", "mha"):
            d_out = d
        else:
            d_out = draw(st.integers(1, 6))
        spec = StepSpec(kind, d_out, bias, act=act)
        if kind in ("conv1d", "conv2d"):
            spec.k = draw(st.sampled_from([1, 3]))
            common = [g for g in (1, 2, 3) if d % g == 0 and d_out % g == 0]
            spec.groups = draw(st.sampled_from(common)) if draw(st.integers(0, 3)) == 0 else 1
        if kind == "mha":
            spec.heads = draw(st.sampled_from([h for h in (1, 2, 3) if d % h == 0]))
        if kind in ("linear", "residual"):
            lins.append((i, d, d_out))
        specs.append(spec)
        d = d_out
    if not vocab and all(sp.kind == "act" for sp in specs):  # at least one weight to adapt
        specs[0] = StepSpec("linear", specs[0].d_out, bias=True)
    tie_head = bool(vocab) and d == d0 and draw(st.booleans())
    return dict(d0=d0, vocab=vocab, padding_idx=padding_idx, specs=specs, blocks=draw(st.booleans()),
                tie_head=tie_head, freq=freq)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """One folder for every example's adapter file (each example replaces the last one's)."""
    return tmp_path_factory.mktemp("adapters")


@given(spec=models(), dtype=st.sampled_from([torch.float32, torch.float32, torch.float64, torch.bfloat16,
                                              torch.float16]),
       rank=st.integers(1, 3), alpha=st.sampled_from([None, 0.5, 3.0]), use_rslora=st.booleans(),
       lowering=st.sampled_from(["auto", "factored", "merge"]), batch=st.integers(1, 2),
       length=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_random_models(adapter_dir, spec, dtype, rank, alpha, use_rslora, lowering, batch, length, seed):
    torch.manual_seed(seed)
    model = Net(**spec).to(dtype)
    if spec["vocab"]:
        x = torch.randint(0, spec["vocab"], (batch, length))
    else:
        x = torch.randn(batch, length, spec["d0"], dtype=dtype)
    snap = snapshot(model)
    kwargs = dict(rank=rank, alpha=alpha, use_rslora=use_rslora, lowering=lowering)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_fx.LoraFxWarning)  # rank > min(fan_out, fan_in) on tiny layers
        gm = lora_fx.transform(model, **kwargs)
    gm2 = copy.deepcopy(gm)  # a second fresh adapted model (B = 0) for the save/load round trip

    # 1. B = 0 ⇒ the adapted model computes what the (frozen) model computes.  Frozen and under
    # no_grad on both sides: PyTorch picks matmul/attention kernels by requires_grad.  Each rewritten
    # op returns its original value bit for bit (tests/test_sites.py), but a value with
    # other strides in size-1 dimensions can take another CPU GEMM path downstream, so the whole
    # model is held to a few roundings of its output's magnitude.
    frozen = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        assert_close(gm(x), frozen(x), ulps=4)

    # 2. random A, B ⇒ output and gradients equal the functional reference (half precision: a
    # float64 reference of the same values; every name of a tied weight gets the one tensor).
    sites = lora_fx.sites(gm)
    assert sites
    randomize_(gm, seed=seed, scale=0.5)
    ref_dtype = torch.float64 if dtype in (torch.bfloat16, torch.float16) else dtype
    leaves = leaf_factors(gm, dtype=ref_dtype)
    y = gm(x)
    y_ref = reference_call(model, gm, (x,), dtype=ref_dtype, factors=leaves, tie_all=True)
    assert y.dtype == (dtype if y.is_floating_point() else y.dtype)
    if y.numel():
        assert_close(y, y_ref, dtype=dtype)
    if dtype not in (torch.bfloat16, torch.float16) and y.numel():
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (y_ref * g.to(ref_dtype)).sum().backward()
        # one backward pass: each factor gradient is a sum of terms of the magnitude of the
        # gradients flowing through it (attention softmax, norms and residuals cancel: a factor's
        # gradient can be far smaller than the terms that made it), so every gradient is held to
        # the roundings of the largest one (measured: the float32 reference itself is off by
        # ~100 ulps of that on such models, lora_fx by about as much)
        scale = max(float(t.grad.abs().max()) for pair in leaves.values() for t in pair)
        for s in lora_fx.sites(gm):
            a, b = leaves[s.param, s.adapter]
            assert_close(s.lora_A.grad, a.grad, dtype=dtype, scale=scale)
            assert_close(s.lora_B.grad, b.grad, dtype=dtype, scale=scale)
        assert all(p.grad is None for n, p in gm.named_parameters() if "lora_" not in n)

    # 3. fold ≡ unfolded, and the folded state loads strict=True into the original architecture.
    folded = lora_fx.fold(gm)
    with torch.no_grad():
        yf = folded(x)
        if yf.numel():
            assert_close(yf, y.detach(), dtype=dtype)
        frozen.load_state_dict(folded.state_dict(), strict=True)  # the original architecture
        assert torch.equal(frozen(x), yf)

    # 4. adapter save/load round trip is exact.
    path = save_lora_state(gm, adapter_dir / "adapter.safetensors")
    load_lora_state(gm2, path)
    sd1, sd2 = lora_fx.lora_state_dict(gm), lora_fx.lora_state_dict(gm2)
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    with torch.no_grad():
        assert torch.equal(gm2(x), gm(x))

    # 5. the user's model is never modified.
    assert_unchanged(model, snap)


def test_profiles_registered():
    """CI's default profile and the documented long run (``--hypothesis-profile=thorough``)."""
    from hypothesis import settings

    default, thorough = settings.get_profile("default"), settings.get_profile("thorough")
    assert default.max_examples >= 200 and default.derandomize and default.deadline is None
    assert thorough.max_examples >= 2000 and thorough.deadline is None
