"""A linear site's base op and first adapter as one call that computes on the merged weight
(lora_fx/linear_site.py, passes/match_linear_site.py): the op's value and gradients equal the
functional reference ``F.linear(x, W + s·B A, b)`` (first and second order, fp32 and fp64, with and
without a bias, a recomputed input), it is the factored expression bit for bit wherever its merged
form does not apply, it keeps what the factored form keeps; graph modules run it (their graphs keep
the factored chain), pickles and copies carry the graph's own code, fold and the inference variant
hold none of it, and under ``torch.compile`` it is the factored form, traced whole."""

from __future__ import annotations

import copy
import functools
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import ops
from lora_fx.linear_site import linear_site, merged_applies

from _reference import check_matches_reference, randomize_
from _tolerance import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

IN, OUT, RANK = 24, 40, 4


def _factors(dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(IN, OUT, bias=bias).to(dtype).requires_grad_(False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(OUT, IN, generator=g).to(dtype) / IN ** 0.5)
    a = (torch.randn(RANK, IN, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(OUT, RANK, generator=g) * 0.3).to(dtype).requires_grad_()
    s = torch.tensor(0.75, dtype=dtype)
    return lin, a, b, s


def _x(*shape, dtype=torch.float32, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).requires_grad_()


def _reference(lin, x, a, b, s):
    return F.linear(x, lin.weight + s * (b @ a), lin.bias)


def _grads(y, leaves, seed=2):
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    return torch.autograd.grad(y, leaves, gy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("layer", ["module", "pair"])
def test_merged_form_matches_the_functional_reference(dtype, bias, layer):
    lin, a, b, s = _factors(dtype, bias=bias)
    x = _x(3, 50, IN, dtype=dtype)
    assert merged_applies(x, lin.weight, lin.bias, a, b, s)
    base = lin if layer == "module" else (lin.weight, lin.bias)
    y = linear_site(base, x, x, a, b, s)
    ref = _reference(lin, x, a, b, s)
    assert_close(y, ref, dtype=dtype)
    for got, want in zip(_grads(y, (x, a, b)), _grads(ref, (x, a, b))):
        assert_close(got, want, dtype=dtype)


def test_merged_form_first_and_second_derivatives():
    lin, a, b, s = _factors(torch.float64)
    x = _x(2, 40, IN, dtype=torch.float64)
    assert merged_applies(x, lin.weight, lin.bias, a, b, s)

    def fn(x, a, b):
        return linear_site(lin, x, x, a, b, s)

    assert torch.autograd.gradcheck(fn, (x, a, b))
    assert torch.autograd.gradgradcheck(fn, (x, a, b))


def _factored(lin, x, a, b, s, remat=None):
    return ops.linear_delta(lin(x), x, a, b, s, remat=remat)


FALLBACKS = {
    "no_grad": lambda t: torch.no_grad(),
    "few rows": None,
    "frozen adapter": None,
    "trainable weight": None,
    "trainable bias": None,
    "bfloat16": None,
    "autocast": lambda t: torch.autocast("cpu", dtype=torch.bfloat16),
    "hooked module": None,
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_where_the_merged_form_does_not_apply_it_is_the_factored_expression_bit_for_bit(case):
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    lin, a, b, s = _factors(dtype)
    rows = 4 if case == "few rows" else 120
    x = _x(rows, IN, dtype=dtype)
    if case == "frozen adapter":
        a.requires_grad_(False), b.requires_grad_(False)
    if case == "trainable weight":
        lin.weight.requires_grad_(True)
    if case == "trainable bias":
        lin.bias.requires_grad_(True)
    if case == "hooked module":
        lin.register_forward_hook(lambda m, i, o: o * 2)
    ctx = FALLBACKS[case]
    with (ctx(None) if ctx else torch.enable_grad()):
        if case not in ("hooked module",):
            assert not merged_applies(x, lin.weight, lin.bias, a, b, s)
        y = linear_site(lin, x, x, a, b, s)
        want = _factored(lin, x, a, b, s)
    assert torch.equal(y, want)
    leaves = [t for t in (x, a, b, lin.weight, lin.bias) if t.requires_grad]
    if y.requires_grad:
        for got, exp in zip(_grads(y, leaves), _grads(want, leaves)):
            assert torch.equal(got, exp)


def _bypass_case(case, lin, a, monkeypatch):
    """Set up one way of calling a Linear that does more than ``F.linear`` (or an adapter the merged
    call would keep more for); returns a list the hook appends to, where there is one."""
    calls: list = []
    if case == "backward hook":
        lin.register_full_backward_hook(lambda m, gi, go: calls.append(1))
    elif case == "global backward hook":
        h = torch.nn.modules.module.register_module_full_backward_hook(lambda m, gi, go: calls.append(1))
        monkeypatch.setattr(h, "_lora_fx_test", True, raising=False)
        calls.append(h)
    elif case == "instance forward":  # what accelerate's hooks install
        plain = lin.forward
        lin.forward = lambda x: (calls.append(1), plain(x))[1]
    elif case == "patched class forward":
        plain = nn.Linear.forward
        monkeypatch.setattr(nn.Linear, "forward", lambda self, x: (calls.append(1), plain(self, x))[1])
    elif case == "wrapped class forward":  # functools.wraps keeps the stock name and module
        plain = nn.Linear.forward

        @functools.wraps(plain)
        def wrapped(self, x):
            calls.append(1)
            return plain(self, x)

        monkeypatch.setattr(nn.Linear, "forward", wrapped)
    elif case == "lora_A frozen":
        a.requires_grad_(False)
    return calls


BYPASS = ["backward hook", "global backward hook", "instance forward", "patched class forward", "wrapped class forward",
          "lora_A frozen"]


@pytest.mark.parametrize("case", BYPASS)
def test_linears_doing_more_than_f_linear_or_a_frozen_lora_a_take_the_factored_expression(case, monkeypatch):
    """Hooks and replaced forwards still run (and see what they saw before), and a frozen lora_A
    keeps no input: every such call is the factored expression bit for bit."""
    lin, a, b, s = _factors()
    calls = _bypass_case(case, lin, a, monkeypatch)
    handle = calls.pop() if case == "global backward hook" else None
    try:
        x = _x(120, IN)
        y = linear_site(lin, x, x, a, b, s)
        want = _factored(lin, x, a, b, s)
        assert torch.equal(y, want)
        leaves = [t for t in (x, a, b) if t.requires_grad]
        for got, exp in zip(_grads(y, leaves), _grads(want, leaves)):
            assert torch.equal(got, exp)
    finally:
        if handle is not None:
            handle.remove()
    if case != "lora_A frozen":
        assert calls and len(calls) % 2 == 0  # the site's call ran the hook as the plain call did
    else:
        assert not merged_applies(x, lin.weight, lin.bias, a, b, s)


def test_the_frozen_weight_is_not_kept_when_the_input_needs_no_gradient():
    """A first layer (x without grad): W is not saved, so writing it in place between forward and
    backward (an EMA, a weight sync) leaves the adapter gradients those of the factored form."""
    lin, a, b, s = _factors()
    x = _x(120, IN).detach()
    assert merged_applies(x, lin.weight, lin.bias, a, b, s)
    y = linear_site(lin, x, x, a, b, s)
    want = _factored(lin, x, a, b, s)
    with torch.no_grad():
        lin.weight.mul_(0.5)
    for got, exp in zip(_grads(y, (a, b)), _grads(want, (a, b))):
        assert_close(got, exp)


@pytest.mark.parametrize("shape", [(0, OUT, RANK), (IN, 0, RANK), (IN, OUT, 0)], ids=["in=0", "out=0", "rank=0"])
def test_empty_weights_and_rank_zero_take_the_factored_expression(shape):
    fan_in, fan_out, rank = shape
    lin = nn.Linear(fan_in, fan_out).requires_grad_(False)
    a = torch.zeros(rank, fan_in, requires_grad=True)
    b = torch.zeros(fan_out, rank, requires_grad=True)
    s = torch.tensor(0.5)
    x = _x(300, fan_in)
    assert not merged_applies(x, lin.weight, lin.bias, a, b, s)
    y = linear_site(lin, x, x, a, b, s)
    assert torch.equal(y, _factored(lin, x, a, b, s)) and y.shape == (300, fan_out)
    y.sum().backward()
    assert a.grad.shape == a.shape and b.grad.shape == b.shape


def test_torch_func_and_forward_ad_take_the_factored_expression():
    lin, a, b, s = _factors()
    x = _x(120, IN)
    g = torch.func.grad(lambda a: linear_site(lin, x, x, a, b, s).sum())(a.detach())
    want = torch.func.grad(lambda a: _factored(lin, x, a, b, s).sum())(a.detach())
    assert torch.equal(g, want)
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        xd = fwAD.make_dual(x.detach(), torch.ones_like(x))
        y = linear_site(lin, xd, xd, a, b, s)
        t = fwAD.unpack_dual(y).tangent
    assert_close(t, F.linear(torch.ones_like(x), lin.weight + s * (b @ a)).detach())


def _saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, nn.Parameter):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def test_it_keeps_no_more_than_the_factored_form_and_recomputes_the_input_of_a_norm():
    lin, a, b, s = _factors()
    norm = nn.LayerNorm(IN)
    u = _x(200, IN)
    remat = ("layer_norm", (u, norm.weight, norm.bias), {"normalized_shape": (IN,), "eps": norm.eps})

    def merged(r):
        x = norm(u)
        return linear_site(lin, x, x, a, b, s, remat=r)

    def factored(r):
        x = norm(u)
        return _factored(lin, x, a, b, s, remat=r)

    assert _saved_bytes(lambda: merged(None)) <= _saved_bytes(lambda: factored(None))
    assert _saved_bytes(lambda: merged(remat)) <= _saved_bytes(lambda: factored(remat))
    assert _saved_bytes(lambda: merged(remat)) < _saved_bytes(lambda: merged(None))
    y, ref = merged(remat), F.linear(norm(u), lin.weight + s * (b @ a), lin.bias)
    assert_close(y, ref)
    for got, want in zip(_grads(y, (u, a, b, norm.weight)), _grads(ref, (u, a, b, norm.weight))):
        assert_close(got, want)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(IN, OUT)
        self.down = nn.Linear(OUT, IN, bias=False)

    def forward(self, x):
        h = torch.tanh(self.up(x))
        return F.linear(h, self.down.weight) + x


def _model():
    torch.manual_seed(0)
    return MLP()


def _calls(gm) -> int:
    return gm.code.count("linear_site(")


def test_graph_modules_run_linear_sites_while_their_graphs_keep_the_factored_chain():
    model = _model()
    gm = lora_fx.transform(model, rank=RANK, alpha=3.0)
    randomize_(gm, seed=3, scale=0.3)
    assert _calls(gm) == 2  # a module call (up) and a functional call (down)
    assert not any(n.target is linear_site for n in gm.graph.nodes)
    assert sum(n.target is ops.linear_delta for n in gm.graph.nodes) == 2
    x = _x(4, 30, IN)
    check_matches_reference(model, gm, (x,))


def test_the_pass_keeps_dropout_sites_and_further_adapters_factored():
    model = _model()
    gm = lora_fx.transform(model, rank=RANK, dropout=0.1)
    assert _calls(gm) == 0  # the adapter reads dropout(x), the base op x
    gm = lora_fx.transform(model, rank=RANK)
    lora_fx.add_adapter(gm, "second", rank=2)
    lora_fx.set_active_adapters(gm, ["default", "second"])
    randomize_(gm, seed=4, scale=0.3)
    for site in lora_fx.sites(gm):
        site.lora_A.requires_grad_(True), site.lora_B.requires_grad_(True)
    assert _calls(gm) == 2 and gm.code.count("linear_delta(") == 2
    check_matches_reference(model, gm, (_x(4, 30, IN),))


def test_pickles_and_copies_carry_the_graph_and_run_linear_sites_again():
    gm = lora_fx.transform(_model(), rank=RANK)
    randomize_(gm, seed=5, scale=0.3)
    x = _x(4, 30, IN)
    want = gm(x)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (loaded, copy.deepcopy(gm)):
        assert not any(n.target is linear_site for n in other.graph.nodes)
        assert _calls(other) == 2
        assert torch.equal(other(x), want)


def test_fold_and_the_inference_cache_hold_no_linear_site():
    model = _model()
    gm = lora_fx.transform(model, rank=RANK)
    randomize_(gm, seed=6, scale=0.3)
    x = _x(4, 30, IN)
    folded = lora_fx.fold(gm)
    assert "linear_site" not in folded.code
    assert_close(folded(x), gm(x))
    with torch.no_grad():
        lora_fx.delete_adapter(gm, "default")
        assert _calls(gm) == 0
        assert torch.equal(gm(x), model(x))


def test_hf_llama_regions_run_linear_sites_exact_against_the_reference():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    gm = lora_fx.transform(model, rank=RANK, targets=["*_proj.weight"])
    randomize_(gm, seed=7, scale=0.2)
    from lora_fx.state import REGION_ATTR
    codes = [m.__dict__[REGION_ATTR].code for m in gm.modules() if REGION_ATTR in m.__dict__]
    assert sum(c.count("linear_site(") for c in codes) == 7
    ids = torch.randint(0, 64, (4, 40), generator=torch.Generator().manual_seed(8))
    gm.train()
    out = gm(input_ids=ids, labels=ids)
    ref = lora_fx.fold(gm)(input_ids=ids, labels=ids)
    assert_close(out.logits, ref.logits)
    out.loss.backward()
    assert all(s.lora_A.grad is not None and s.lora_B.grad.abs().sum() > 0 for s in lora_fx.sites(gm))


def test_torch_compile_runs_the_factored_form_without_graph_breaks():
    model = _model()
    gm = lora_fx.transform(model, rank=RANK)
    randomize_(gm, seed=9, scale=0.3)
    x = _x(4, 30, IN)
    explain = torch._dynamo.explain(gm)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(gm, backend="aot_eager", fullgraph=True)
    y, want = compiled(x), gm(x)
    assert_close(y, want)
    leaves = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)] + [x]
    for got, exp in zip(_grads(y, leaves), _grads(want, leaves)):
        assert_close(got, exp)
