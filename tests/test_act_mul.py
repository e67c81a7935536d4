"""Gated activations ``act(g) * u`` that keep ``g`` and ``u`` instead of ``act(g)`` (lora_fx/act_mul.py,
passes/match_act_mul.py): the op equals the plain expression bit for bit, forward and backward
(first and second order, fp32 and bf16, autocast), falls back to it where its saving form does not
apply, saves one tensor less; the pass rewrites gated MLPs of captured graphs (both front-ends, HF
Llama), is undone by fold and by the inference variant, and is off with ``recompute_inputs=False``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx.act_mul import act_mul
from lora_fx.recompute import recompute_point

from _hf import inputs, targets, tiny
from _reference import check_matches_reference, randomize_
from _tolerance import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

ACTS = [("silu", "none", lambda g: F.silu(g)), ("gelu", "none", lambda g: F.gelu(g)),
        ("gelu", "tanh", lambda g: F.gelu(g, approximate="tanh"))]


def _leaves(*shape, dtype=torch.float32, seed=0, grads=(True, True)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen).to(dtype).requires_grad_(r) for r in grads]


def _saved(fn, *args) -> list[torch.Size]:
    shapes = []

    def pack(t):
        shapes.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return shapes


@pytest.mark.parametrize("act,approximate,plain", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grads", [(True, True), (True, False), (False, True)])
def test_bitwise_the_plain_expression(act, approximate, plain, dtype, grads):
    g, u = _leaves(3, 5, 7, dtype=dtype, grads=grads)
    g2, u2 = (t.detach().clone().requires_grad_(t.requires_grad) for t in (g, u))
    y, y2 = act_mul(g, u, act, approximate), plain(g2) * u2
    assert y.dtype == dtype and torch.equal(y, y2)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    wrt = [t for t in (g, u) if t.requires_grad]
    wrt2 = [t for t in (g2, u2) if t.requires_grad]
    for a, b in zip(torch.autograd.grad(y, wrt, gy), torch.autograd.grad(y2, wrt2, gy)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("act,approximate,plain", ACTS)
def test_keeps_one_tensor_less(act, approximate, plain):
    g, u = _leaves(4, 6)
    assert len(_saved(lambda: act_mul(g, u, act, approximate))) == 2
    assert len(_saved(lambda: plain(g) * u)) == 3


@pytest.mark.parametrize("act,approximate,plain", ACTS)
def test_second_derivatives(act, approximate, plain):
    g, u = _leaves(4, 6, dtype=torch.float64)
    g2, u2 = (t.detach().clone().requires_grad_() for t in (g, u))
    for y, (a, b) in ((act_mul(g, u, act, approximate).sum(), (g, u)), ((plain(g2) * u2).sum(), (g2, u2))):
        ga, gb = torch.autograd.grad(y, (a, b), create_graph=True)
        (ga * gb).sum().backward()
    assert torch.allclose(g.grad, g2.grad, rtol=1e-12, atol=1e-12)
    assert torch.allclose(u.grad, u2.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: act_mul(a, b, act, approximate), _leaves(3, 4, dtype=torch.float64))
    assert torch.autograd.gradgradcheck(lambda a, b: act_mul(a, b, act, approximate), _leaves(3, 4, dtype=torch.float64))


def test_under_autocast_bitwise():
    g, u = _leaves(4, 6)
    g2, u2 = (t.detach().clone().requires_grad_() for t in (g, u))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = act_mul(g, u) @ torch.ones(6, 2)
        y2 = (F.silu(g2) * u2) @ torch.ones(6, 2)
    assert torch.equal(y, y2)
    y.sum().backward(), y2.sum().backward()
    assert torch.equal(g.grad, g2.grad) and torch.equal(u.grad, u2.grad)


@pytest.mark.parametrize("case", ["broadcast", "dtypes", "no_grad", "func_grad", "forward_ad"])
def test_plain_where_the_saving_form_does_not_apply(case):
    g, u = _leaves(3, 1, 5)
    if case == "broadcast":
        u = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    if case == "dtypes":
        u = u.detach().double().requires_grad_()
    g2, u2 = (t.detach().clone().requires_grad_() for t in (g, u))
    if case == "no_grad":
        with torch.no_grad():
            assert torch.equal(act_mul(g, u), F.silu(g) * u) and not act_mul(g, u).requires_grad
        return
    if case == "func_grad":
        got = torch.func.grad(lambda a: act_mul(a, u.detach()).sum())(g.detach())
        want = torch.func.grad(lambda a: (F.silu(a) * u.detach()).sum())(g.detach())
        assert torch.equal(got, want)
        return
    if case == "forward_ad":
        tangent = torch.ones_like(g)
        got = torch.func.jvp(lambda a: act_mul(a, u.detach()), (g.detach(),), (tangent,))
        want = torch.func.jvp(lambda a: F.silu(a) * u.detach(), (g.detach(),), (tangent,))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        return
    assert len(_saved(lambda: act_mul(g, u))) == 3  # the plain expression's three
    y, y2 = act_mul(g, u), F.silu(g2) * u2
    assert y.shape == y2.shape and y.dtype == y2.dtype and torch.equal(y, y2)
    y.sum().backward(), y2.sum().backward()
    assert torch.equal(g.grad, g2.grad) and torch.equal(u.grad, u2.grad)


class Gated(nn.Module):
    """Two gated MLPs (silu, then gelu-tanh with the operands swapped), an activation read twice and
    one multiplied by its own input."""

    def __init__(self):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(6, 10), nn.Linear(6, 10), nn.Linear(10, 6)
        self.gate2, self.up2, self.down2 = nn.Linear(6, 8), nn.Linear(6, 8, bias=False), nn.Linear(8, 5)
        self.skip = nn.Linear(8, 5)

    def forward(self, x):
        h = self.down(F.silu(self.gate(x)) * self.up(x)) + x
        a = F.gelu(self.gate2(h), approximate="tanh")
        g = self.up2(h)
        z = F.silu(g) * g  # the gate is the other factor too: left alone
        return self.down2(self.up2(h) * F.gelu(self.gate2(h), approximate="tanh")) + self.skip(a * a + z)


def _act_mul_nodes(gm) -> int:
    """``act_mul`` calls of ``gm``'s graph, plain or as the recompute point of a site reading them."""
    return sum(n.op == "call_function" and (n.target is act_mul or (n.target is recompute_point
                                                                  and n.args[0] == "lora_fx.act_mul"))
               for n in gm.graph.nodes)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_the_pass_on_a_captured_model(frontend):
    torch.manual_seed(0)
    model = Gated()
    x = torch.randn(3, 4, 6)
    kw = {"frontend": frontend, "example_inputs": (x,)} if frontend == "export" else {"frontend": frontend}
    gm = randomize_(lora_fx.transform(model, rank=3, **kw))
    assert _act_mul_nodes(gm) == 2  # the activation read twice (a * a) is left alone
    check_matches_reference(model, gm, (x,))
    off = lora_fx.transform(model, rank=3, recompute_inputs=False, **kw)
    assert _act_mul_nodes(off) == 0
    folded = lora_fx.fold(gm)
    assert _act_mul_nodes(folded) == 0 and "act_mul" not in folded.code
    with torch.no_grad():
        assert_close(folded(x), gm(x))


def test_hf_llama_mlp_keeps_the_gate_output_only():
    on = randomize_(lora_fx.transform(tiny("llama"), rank=4, targets=targets("llama")), scale=0.2)
    off = randomize_(lora_fx.transform(tiny("llama"), rank=4, targets=targets("llama"), recompute_inputs=False),
                     scale=0.2)
    x = inputs("llama")
    layers = on.config.num_hidden_layers
    regions = [m.__dict__[lora_fx.state.REGION_ATTR] for m in on.modules() if lora_fx.state.REGION_ATTR in m.__dict__]
    assert sum(_act_mul_nodes(r) for r in regions) == layers
    grads = []
    for m in (on, off):
        m.zero_grad(set_to_none=True)
        m(**x, labels=x["input_ids"]).loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])
    # the inference cache runs the plain expression (the variant holds no act_mul)
    with lora_fx.inference_cache(on), torch.no_grad():
        folded = lora_fx.fold(on)
        assert torch.equal(on(**x).logits, folded(**x).logits)
        variants = [m.forward._infer for m in on.modules() if getattr(m.__dict__.get("forward"), "_infer", None)]
        assert variants and all("act_mul" not in str(v.code.__code__.co_names) for v in variants)


def test_a_weight_in_the_product_is_a_site_not_a_gate():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return self.fc(F.silu(x) * self.scale)

    torch.manual_seed(0)
    model = Scaled()
    gm = randomize_(lora_fx.transform(model, rank=2, targets=["scale", "fc.weight"]))
    assert _act_mul_nodes(gm) == 0
    check_matches_reference(model, gm, (torch.randn(2, 3, 4),))


def test_g_without_grad_is_the_plain_expression():
    g, u = _leaves(4, 6, grads=(False, True))
    assert len(_saved(lambda: act_mul(g, u))) == 1  # act(g) alone, as the plain expression keeps


def test_unknown_activation_is_a_config_error():
    with pytest.raises(lora_fx.ConfigError, match="act='relu' is not supported; use one of"):
        act_mul(torch.ones(2), torch.ones(2), act="relu")


class WriteBetween(nn.Module):
    """``g`` written in place (or read by another op) between the activation and the product."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.gate, self.up, self.down, self.side = (nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 6),
                                                    nn.Linear(8, 6))

    def forward(self, x):
        g = self.gate(x)
        if self.how == "before":
            g.mul_(2.0)
        a = F.silu(g)
        side = 0
        if self.how == "write":
            g.add_(1.0)
        if self.how == "read":  # another reader of g's gradient between the two (accumulation order)
            side = self.side(g * 3.0) + self.side(g.exp())
        return self.down(a * self.up(x)) + side


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("how", ["write", "read", "before"])
def test_nothing_between_the_activation_and_the_product(frontend, how):
    torch.manual_seed(0)
    model = WriteBetween(how)
    x = torch.randn(5, 6)
    kw = {"frontend": frontend, "example_inputs": (x,)} if frontend == "export" else {"frontend": frontend}
    on = randomize_(lora_fx.transform(model, rank=3, **kw))
    off = randomize_(lora_fx.transform(model, rank=3, recompute_inputs=False, **kw))
    graphs = [m for m in on.modules() if isinstance(m, torch.fx.GraphModule)]
    assert sum(_act_mul_nodes(m) for m in graphs) == (1 if how == "before" else 0)
    with torch.no_grad():
        assert torch.equal(on(x), off(x))
    if how == "write":  # silu keeps g for its backward: training raises autograd's in-place error, in both
        for m in (on, off):
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                m(x).sum().backward()
    else:
        for m in (on, off):
            m.zero_grad(set_to_none=True)
            m(x).square().sum().backward()
        assert all(torch.equal(a.grad, b.grad) for a, b in zip(on.parameters(), off.parameters()) if a.requires_grad)
    folded = lora_fx.fold(on)
    assert sum(_act_mul_nodes(m) for m in folded.modules() if isinstance(m, torch.fx.GraphModule)) == 0
    with torch.no_grad():
        assert torch.allclose(folded(x), on(x), rtol=1e-5, atol=1e-6)


def test_export_front_end_pickle_keeps_the_rewrite():
    import pickle

    torch.manual_seed(0)
    model = Gated()
    x = torch.randn(3, 4, 6)
    gm = lora_fx.transform(model, rank=3, frontend="export", example_inputs=(x,))
    copy_ = pickle.loads(pickle.dumps(gm))
    count = lambda m: sum(_act_mul_nodes(g) for g in m.modules() if isinstance(g, torch.fx.GraphModule))  # noqa: E731
    assert count(copy_) == count(gm) == 2


def test_the_cache_restores_exactly_the_norms_it_took_tags_from():
    from lora_fx.producers import ProducerForward

    def tags(m):
        return sum(isinstance(mod.__dict__.get("forward"), ProducerForward) for mod in m.modules())

    off = lora_fx.transform(tiny("llama"), rank=2, targets=targets("llama"), recompute_inputs=False)
    lora_fx.add_adapter(off, "second", rank=2, targets=targets("llama"))  # recompute on: tags stay off
    on = lora_fx.transform(tiny("llama"), rank=2, targets=targets("llama"))
    for model in (off, on, copied := copy.deepcopy(on)):
        before = tags(model)
        with lora_fx.inference_cache(model):
            assert tags(model) == 0
            inside = copy.deepcopy(model)
        assert tags(model) == before
        lora_fx.inference_cache_(inside, enabled=False)
        assert tags(inside) == before
    assert tags(on) == tags(copied) > 0 and tags(off) == 0


def test_backward_computes_the_activation_once_per_mlp(monkeypatch):
    """down_proj's recomputed input hands act(g) to the product's backward (no second act(g))."""
    import lora_fx.act_mul as module

    calls = {"n": 0}
    forward, backward = module.ACTIVATIONS["silu"]

    def counted(g, approximate):
        calls["n"] += 1
        return forward(g, approximate)

    monkeypatch.setitem(module.ACTIVATIONS, "silu", (counted, backward))
    on = randomize_(lora_fx.transform(tiny("llama"), rank=4, targets=targets("llama")), scale=0.2)
    off = randomize_(lora_fx.transform(tiny("llama"), rank=4, targets=targets("llama"), recompute_inputs=False),
                     scale=0.2)
    x = inputs("llama")
    loss = on(**x, labels=x["input_ids"]).loss
    calls["n"] = 0
    loss.backward()
    assert calls["n"] == on.config.num_hidden_layers
    off(**x, labels=x["input_ids"]).loss.backward()
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(on.parameters(), off.parameters()) if a.requires_grad)
