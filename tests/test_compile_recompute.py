"""Adapter-input recomputation under torch.compile: producers of recomputable adapter inputs become
``recompute_point`` nodes, which run under ``torch.utils.checkpoint`` when Dynamo traces them, so
AOTAutograd's min-cut partitioner recomputes the inputs in backward instead of saving them.

Compilation is real torch.compile with the fast backend of ``tests/_partitioner.py`` (AOTAutograd and
the min-cut partitioner Inductor uses, no code generation), which reports the saved activations.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import fx, nn
from torch._dynamo.testing import CompileCounterWithBackend

import lora_fx
from lora_fx import ops

from _partitioner import saving_backend
from _reference import randomize_, reference_call
from _tolerance import assert_close


_backend = saving_backend


class Block(nn.Module):
    """Llama-style: an RMSNorm leaf feeding q/v, a gated SiLU MLP (``a * b`` producer), then a
    functional layer_norm and a GELU leaf; every adapted input is recomputable."""

    def __init__(self, d=16, h=24):
        super().__init__()
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.q, self.v = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        self.fc, self.act, self.out = nn.Linear(d, h), nn.GELU(approximate="tanh"), nn.Linear(h, 12)

    def forward(self, x):
        n = self.norm(x)
        x = x + self.q(n) * self.v(n).sigmoid()
        x = x + self.down(F.silu(self.gate(x)) * self.up(x))
        return self.out(self.act(self.fc(F.layer_norm(x, (16,)))))


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = Block().to(dtype)
    with torch.no_grad():
        model.norm.weight.add_(torch.randn_like(model.norm.weight) * 0.3)
    return model


def _adapted(model, **kw):
    return randomize_(lora_fx.transform(model, rank=3, alpha=5, **kw))


def _x(dtype=torch.float32):
    return torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)


def _train_step(fn, gm, x, autocast=False):
    """Output, input gradient and adapter gradients of one weighted-sum backward."""
    x = x.detach().clone().requires_grad_(True)
    params = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(x)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad((out.float() * w).sum(), [x] + params)
    return out, grads


def _compiled_step(gm, x, autocast=False, **kw):
    saved: list = []
    torch._dynamo.reset()
    out, grads = _train_step(torch.compile(gm, backend=_backend(saved), fullgraph=True, **kw), gm, x, autocast)
    assert len(saved) == 1  # one graph
    return out, grads, saved[0]


def _points(gm):
    return [n for m in gm.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes
            if n.op == "call_function" and n.target is ops.recompute_point]


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast-bf16"])
def test_compiled_saves_less_and_matches_eager(autocast):
    """The issue's memory target: the compiled step keeps fewer activation bytes with recomputation
    than without (every site's input here is recomputable), and computes what eager computes."""
    model = _model()
    gm, plain = _adapted(model), _adapted(model, recompute_inputs=False)
    x = _x()
    out, grads, saved = _compiled_step(gm, x, autocast)
    _, _, saved_plain = _compiled_step(plain, x, autocast)
    # without autocast the seven adapted inputs (2x6 tokens, fp32) of widths 16 (norm, shared by q
    # and v), 16 (x, shared by gate and up: not a producer), 24 (silu*up), 16 (layer_norm), 24 (gelu)
    # need not be kept; under autocast their bf16 casts
    per_token = (16 + 24 + 16 + 24) * (2 if autocast else 4)
    assert saved_plain - saved >= 12 * per_token, (saved, saved_plain)
    eout, egrads = _train_step(gm, gm, x, autocast)
    dtype = torch.bfloat16 if autocast else torch.float32
    assert_close(out, eout, dtype=dtype)
    assert_close(grads, egrads, dtype=dtype)
    if not autocast:
        rout, rgrads = _train_step(lambda xx: reference_call(model, gm, (xx,)), gm, x)
        assert_close(out, rout)
        assert_close(grads, rgrads)


def test_compiled_saves_less_at_a_batch_where_eager_runs_merged_weight_linear_sites():
    """With many rows eager linear sites compute on the merged weight (lora_fx.linear_site); compiled
    code keeps the factored form, whose inputs the partitioner recomputes (a Function's saved input
    would be kept: no saving)."""
    from lora_fx.linear_site import merged_applies

    model = _model()
    gm, plain = _adapted(model), _adapted(model, recompute_inputs=False)
    x = torch.randn(4, 40, 16, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    site = lora_fx.sites(gm)[0]
    assert merged_applies(x, gm.get_parameter(site.param), None, site.lora_A, site.lora_B, site.module.scaling)
    out, grads, saved = _compiled_step(gm, x)
    _, _, saved_plain = _compiled_step(plain, x)
    assert saved_plain - saved >= 160 * (16 + 24 + 16 + 24) * 4, (saved, saved_plain)
    eout, egrads = _train_step(gm, gm, x)
    assert_close(out, eout)
    assert_close(grads, egrads)


def test_bf16_model_compiled_matches_eager_and_saves_less():
    model = _model(torch.bfloat16)
    gm, plain = _adapted(model), _adapted(model, recompute_inputs=False)
    x = _x(torch.bfloat16)
    out, grads, saved = _compiled_step(gm, x)
    _, _, saved_plain = _compiled_step(plain, x)
    assert saved < saved_plain
    eout, egrads = _train_step(gm, gm, x)
    assert_close(out, eout, dtype=torch.bfloat16)
    assert_close(grads, egrads, dtype=torch.bfloat16)


def test_no_graph_breaks_and_no_recompiles_on_hot_swap():
    gm = _adapted(_model())
    x = _x()
    explain = torch._dynamo.explain(gm)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    torch._dynamo.reset()
    cnt = CompileCounterWithBackend(_backend([]))
    compiled = torch.compile(gm, fullgraph=True, backend=cnt)

    def check():
        out, grads = _train_step(compiled, gm, x)
        want, wgrads = _train_step(gm, gm, x)
        assert_close(out, want)
        assert_close(grads, wgrads)

    check()
    lora_fx.set_scale_(gm, 0.5)
    check()
    lora_fx.enable_adapters_(gm, False)
    check()
    lora_fx.enable_adapters_(gm, True)
    other = {k: torch.randn_like(v) for k, v in lora_fx.lora_state_dict(gm).items()}
    lora_fx.load_adapter_values_(gm, other)
    check()
    with torch.no_grad():  # inference through the same compiled model: plain calls, no checkpoint
        assert_close(compiled(x), gm(x))
    assert cnt.frame_count == 2  # the training graph and the no_grad graph, nothing else


class _InplaceAfter(nn.Module):
    """``h = gelu(u); h.relu_(); fc(h)``: the input the adapter sees was changed after its producer."""

    def __init__(self):
        super().__init__()
        self.ln, self.fc, self.out = nn.LayerNorm(8), nn.Linear(8, 12), nn.Linear(12, 5)

    def forward(self, u):
        h = F.gelu(self.ln(u))
        h.relu_()
        return self.out(F.gelu(self.fc(h)))


def test_in_place_change_after_the_producer_stays_exact():
    torch.manual_seed(0)
    model = _InplaceAfter()
    gm = _adapted(model)
    x = torch.randn(3, 4, 8, requires_grad=True)
    out, grads, _ = _compiled_step(gm, x)
    rout, rgrads = _train_step(lambda xx: reference_call(model, gm, (xx,)), gm, x)
    assert_close(out, rout)
    assert_close(grads, rgrads)


def test_leaf_producer_hooked_after_transform_is_called_plainly():
    """A hook added after transform (here: doubling the norm's output) is in the compiled result."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 3))
    gm = _adapted(model)
    for m in (model, gm):
        m.get_submodule("0").register_forward_hook(lambda mod, args, out: out * 2)
    x = torch.randn(3, 4, 8, requires_grad=True)
    out, grads, _ = _compiled_step(gm, x)
    rout, rgrads = _train_step(lambda xx: reference_call(model, gm, (xx,)), gm, x)
    assert_close(out, rout)
    assert_close(grads, rgrads)


def test_points_restored_when_the_last_site_goes():
    """delete_adapter keeps the producers a remaining adapter recomputes and restores the rest;
    fold gives back the original graph."""
    model = _model()
    gm = lora_fx.transform(model, rank=2)
    plain_code = lora_fx.fold(lora_fx.transform(model, rank=2, recompute_inputs=False)).code
    n_points = len(_points(gm))
    assert n_points == 4  # norm, silu*up, layer_norm, gelu
    lora_fx.add_adapter(gm, "other", rank=2, targets=["q.weight"])
    assert len(_points(gm)) == n_points
    lora_fx.delete_adapter(gm, "default")
    kept = _points(gm)
    assert len(kept) == 1
    assert_close(gm(_x()), reference_call(model, gm, (_x(),)))
    lora_fx.delete_adapter(gm, "other")
    assert _points(gm) == [] and [n.op for n in gm.graph.nodes if n.op == "get_attr"] == []
    folded = lora_fx.fold(lora_fx.transform(model, rank=2))
    assert folded.code == plain_code and _points(folded) == []


def test_export_of_an_adapted_model_has_no_checkpoint_regions():
    gm = _adapted(_model())
    x = _x()
    for strict in (False, True):
        ep = torch.export.export(gm, (x,), strict=strict)
        assert not any("checkpoint" in str(n.target) for n in ep.graph.nodes)
        assert_close(ep.module()(x), gm(x))
