"""The eager linear delta (lora_fx/eager_delta.py): one autograd Function per factored linear site,
the up-projection accumulated into the base output where nothing else holds it.

Outputs and gradients must equal the functional reference and the plain ops (the same GEMMs), in
fp32 and bf16, with and without input recomputation, in training and in ``no_grad``; second
derivatives must stay right; and a base output that anything else holds is never overwritten.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import eager_delta, ops

from _reference import randomize_, reference_call
from _tolerance import assert_close


class Net(nn.Module):
    """A norm leaf feeding a biased linear (recomputable input), a functional linear on a reshaped
    input (not recomputable), and a bias-free linear after GELU."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 12)
        self.w = nn.Parameter(torch.randn(6, 12) * 0.3)
        self.out = nn.Linear(6, 5, bias=False)

    def forward(self, x):
        h = self.fc(self.ln(x))
        h = F.linear(h.transpose(0, 1).reshape(h.shape), self.w)
        return self.out(F.gelu(h))


@contextlib.contextmanager
def _plain_ops():
    eager_delta.ENABLED = False
    try:
        yield
    finally:
        eager_delta.ENABLED = True


def _pair(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = Net().to(dtype)
    return model, randomize_(lora_fx.transform(model, rank=3, alpha=5, **kw))


def _step(fn, gm, x):
    x = x.detach().clone().requires_grad_(True)
    params = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    out = fn(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.dtype)
    return out, torch.autograd.grad((out * w).sum(), [x] + params)


def _x(dtype=torch.float32, shape=(3, 4, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)


def test_sites_get_inplace_where_the_base_is_a_plain_linear():
    _, gm = _pair()
    kw = {n.args[0].name: n.kwargs for n in gm.graph.nodes if n.target is ops.linear_delta}
    assert kw["fc"]["inplace"] and kw["linear"]["inplace"] and kw["out"]["inplace"], kw
    assert "remat" in kw["fc"] and "remat" in kw["out"] and "remat" not in kw["linear"]

    class Relu(nn.Module):  # the user's own in-place flags are left alone
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            u = x * 2
            return self.fc(F.relu(u, inplace=True)) + u

    gm = lora_fx.transform(Relu(), rank=2)
    assert [n.kwargs for n in gm.graph.nodes if n.target is F.relu] == [{"inplace": True}]


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_plain_ops_and_reference(recompute, dtype):
    model, gm = _pair(dtype, recompute_inputs=recompute, adapter_dtype=dtype)  # bf16 factors: one dtype
    for shape in ((3, 4, 8), (5, 8)):
        x = _x(dtype, shape)
        out, grads = _step(gm, gm, x)
        with _plain_ops():
            pout, pgrads = _step(gm, gm, x)
        # the same GEMMs on the same operands; a BLAS may block addmm_ differently from addmm
        assert_close(out, pout, dtype=dtype, ulps=8 if dtype == torch.float32 else 1)
        assert_close(grads, pgrads, dtype=dtype, ulps=8 if dtype == torch.float32 else 1)
        if dtype == torch.float32:
            rout, rgrads = _step(lambda xx: reference_call(model, gm, (xx,)), gm, x)
            assert_close(out, rout)
            assert_close(grads, rgrads)


def test_no_grad_matches_and_overwrites_nothing_it_must_not():
    model, gm = _pair()
    x = _x()
    with torch.no_grad():
        assert_close(gm(x), reference_call(model, gm, (x,)))
    with torch.inference_mode():
        assert_close(gm(x), reference_call(model, gm, (x,)))


@pytest.mark.parametrize("keep", ["tensor", "view", "detached"])
def test_base_output_held_elsewhere_is_not_overwritten(keep):
    """A forward hook added after transform keeps the base output (itself, a view, a detached
    alias): it must keep the base output's values, and the site still adds its delta."""
    model, gm = _pair()
    x = _x()
    kept = []
    gm.fc.register_forward_hook(lambda m, a, out: kept.append(
        out if keep == "tensor" else out[0] if keep == "view" else out.detach()))
    with torch.no_grad():
        base = F.linear(gm.ln(x), gm.fc.weight, gm.fc.bias)
    out = gm(x)
    assert torch.equal(kept[0], base[0] if keep == "view" else base)
    assert_close(out, reference_call(model, gm, (x,)))


def test_inplace_uses_the_base_output_memory():
    _, gm = _pair()
    x = _x()
    ptrs = []
    gm.out.register_forward_hook(lambda m, a, out: ptrs.append(out.data_ptr()))  # the bias-free 'out' site
    out = gm(x)
    assert out.data_ptr() == ptrs[0]
    with _plain_ops():
        assert gm(x).data_ptr() != ptrs[-1]


def test_second_derivatives_match_reference():
    model, gm = _pair()
    x = _x(shape=(2, 8)).requires_grad_(True)
    sites = lora_fx.sites(gm)
    params = [p for s in sites for p in (s.lora_A, s.lora_B)]

    def gradnorm(fn):
        (g,) = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        return g.pow(2).sum()

    got = torch.autograd.grad(gradnorm(gm), params)
    want = torch.autograd.grad(gradnorm(lambda xx: reference_call(model, gm, (xx,))), params)
    assert_close(got, want)


def test_fallbacks_compute_the_same():
    """Autocast, fp32 adapters on a bf16 model and tensors of another dtype run the plain ops."""
    model, gm = _pair()
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gm(x)
        ref = reference_call(model, gm, (x,))
    assert_close(out.float(), ref.float(), dtype=torch.bfloat16)
    torch.manual_seed(0)
    model16 = Net().to(torch.bfloat16)
    gm16 = randomize_(lora_fx.transform(model16, rank=3, adapter_dtype=torch.float32))
    x16 = _x(torch.bfloat16)
    out, grads = _step(gm16, gm16, x16)
    with _plain_ops():
        pout, pgrads = _step(gm16, gm16, x16)
    assert torch.equal(out, pout)
    assert_close(grads, pgrads, ulps=0)


class _OwnView(torch.autograd.Function):
    """``x Wᵀ`` returned as a view of a tensor the Function made (as a quantized kernel's
    ``out.view(...)``): autograd records the output as the Function's, not as a view."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(w)
        return torch.mm(x.reshape(-1, x.shape[-1]), w.t()).view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return g @ w, None


def test_output_viewing_a_functions_own_tensor_keeps_its_gradient():
    torch.manual_seed(0)
    x, w = torch.randn(3, 4, 8, requires_grad=True), torch.randn(6, 8)
    A, B, s = torch.randn(2, 8, requires_grad=True), torch.randn(6, 2, requires_grad=True), torch.tensor(0.5)
    y = _OwnView.apply(x, w)
    assert y._base is not None
    got = torch.autograd.grad(ops.linear_delta(y, x, A, B, s, inplace=True).sum(), (x, A, B))
    want = torch.autograd.grad((F.linear(x, w) + s * F.linear(F.linear(x, A), B)).sum(), (x, A, B))
    assert_close(got, want)
