"""torch.compile(fullgraph=True) on adapted models of every site kind, and hot-swapping adapter
values, scale, enabled state and rank without recompiling (CASES.md 3 and 4).

Compilation is real torch.compile (Dynamo + AOTAutograd, forward and backward) with the
``aot_eager`` backend, which keeps the tests fast on a CPU; the benchmark exercises Inductor.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import lora_fx
import lora_fx.control
from lora_fx.errors import AdapterMismatchError, ConfigError, NotAdaptedError

from _reference import lora_weight, randomize_, reference_call
from _tolerance import assert_close
from _zoo import ZOO, build

COMPILE = [ZOO[n] for n in ("Linear-3d", "F.linear", "Embedding-padding_idx", "Embedding-freq-pad", "Conv1d",
                            "Conv2d-groups", "Conv2d-circular", "ConvTranspose2d", "matmul-right-operator",
                            "matmul-left-2d", "addmm-right", "MHA-fused", "MHA-kdim")]


def _counter():
    return CompileCounterWithBackend("aot_eager")


def _grads(gm):
    return [p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad]


# every kind under "auto"; "merge" too where auto factors
COMPILE_CASES = [(c, "auto") for c in COMPILE] + [(c, "merge") for c in COMPILE if c.factorable]


@pytest.mark.parametrize("case,lowering", COMPILE_CASES, ids=[f"{c.name}-{low}" for c, low in COMPILE_CASES])
def test_fullgraph_compile_forward_backward(case, lowering):
    model, (x,) = build(case)
    gm = randomize_(lora_fx.transform(model, rank=2, alpha=3, lowering=lowering, **case.kw))
    explain = torch._dynamo.explain(gm)(x)
    assert explain.graph_break_count == 0 and explain.graph_count == 1, explain.break_reasons
    torch._dynamo.reset()

    cnt = _counter()
    compiled = torch.compile(gm, fullgraph=True, backend=cnt)
    out = compiled(x)
    out.square().sum().backward()
    got = _grads(gm)
    gm.zero_grad(set_to_none=True)
    want_out = gm(x)
    want_out.square().sum().backward()
    assert_close(out, want_out)
    for g, w in zip(got, _grads(gm)):
        assert_close(g, w)
    assert_close(out, reference_call(model, gm, (x,)))
    assert cnt.frame_count == 1
    compiled(x)
    assert cnt.frame_count == 1


def test_fullgraph_compile_with_dropout_no_breaks():
    model, (x,) = build(ZOO["Conv1d"])
    gm = lora_fx.transform(model, rank=2, dropout=0.3)
    for mode in (gm.train, gm.eval):
        mode()
        torch._dynamo.reset()
        ex = torch._dynamo.explain(gm)(x)
        assert ex.graph_break_count == 0
    cnt = _counter()
    compiled = torch.compile(gm, fullgraph=True, backend=cnt)
    gm.eval()
    assert_close(compiled(x), gm(x))


class _Blocks(nn.Module):
    """Blocks in a ModuleList are traced into their own GraphModules (nested calls)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 24), nn.GELU(),
                                                  nn.Linear(24, 16)) for _ in range(3))
        self.head = nn.Linear(16, 30, bias=False)

    def forward(self, idx):
        h = self.emb(idx)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def test_fullgraph_compile_nested_blocks():
    model = _Blocks()
    gm = randomize_(lora_fx.transform(model, rank=4))
    idx = torch.randint(0, 30, (2, 7))
    assert torch._dynamo.explain(gm)(idx).graph_break_count == 0
    torch._dynamo.reset()
    cnt = _counter()
    out = torch.compile(gm, fullgraph=True, backend=cnt)(idx)
    assert_close(out, reference_call(model, gm, (idx,)))
    assert cnt.frame_count == 1


# --------------------------------------------------------------------------------------------
# hot swap (CASES.md 3)


def _case3():
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    gm = randomize_(lora_fx.transform(model, rank=2, alpha=4))
    return model, gm, torch.randn(3, 8)


@pytest.mark.parametrize("lowering", ["factored", "merge"])
def test_case3_no_stale_graph_and_no_recompile(lowering):
    """CASES.md 3: a compiled adapted Linear(8, 8) equals eager after every value change (disable,
    enable, scale, alpha, other values, in-place edits), with no recompilation."""
    model = nn.Linear(8, 8)
    gm = randomize_(lora_fx.transform(model, rank=2, alpha=4, lowering=lowering))
    x = torch.randn(3, 8)
    cnt = _counter()
    compiled = torch.compile(gm, fullgraph=True, backend=cnt)
    site = lora_fx.sites(gm)[0]

    def check(expect_delta_scale):
        out = compiled(x)
        assert torch.equal(out, gm(x))
        W = lora_weight(model.weight, site.lora_A.detach(), site.lora_B.detach(), expect_delta_scale)
        assert_close(out, torch.nn.functional.linear(x, W, model.bias))

    check(2.0)
    lora_fx.enable_adapters_(gm, False)
    check(0.0)
    assert_close(compiled(x), model(x))
    lora_fx.enable_adapters_(gm, True)
    check(2.0)
    lora_fx.set_scale_(gm, 0.5)
    check(1.0)
    with lora_fx.control.disable_adapters(gm):
        check(0.0)
    check(1.0)
    lora_fx.set_scale_(gm, 1.0)
    site.module.alpha = 8.0  # raw attribute + refresh, as lora_fx.control does
    site.module.refresh_scaling_()
    check(4.0)
    site.module.alpha = 4.0
    site.module.refresh_scaling_()
    other = {k: torch.randn_like(v) for k, v in lora_fx.lora_state_dict(gm).items()}
    lora_fx.load_adapter_values_(gm, other)
    assert torch.equal(site.lora_A, other["lora.default.weight.lora_A"])
    check(2.0)
    with torch.no_grad():  # plain in-place edits are seen too
        site.lora_B.mul_(-3)
    check(2.0)
    out = compiled(x)
    out.sum().backward()  # training after the swaps: same compiled graph
    assert site.lora_A.grad is not None
    assert cnt.frame_count == 1


def test_load_another_adapter_of_same_ranks_from_other_transform():
    model, gm, x = _case3()
    donor = randomize_(lora_fx.transform(model, rank=2, alpha=4), seed=9)
    cnt = _counter()
    compiled = torch.compile(gm, fullgraph=True, backend=cnt)
    compiled(x)
    lora_fx.load_adapter_values_(gm, lora_fx.lora_state_dict(donor))
    assert_close(compiled(x), donor(x))
    assert cnt.frame_count == 1


def test_control_errors_name_the_fix():
    model, gm, x = _case3()
    with pytest.raises(NotAdaptedError, match="adapters present: \\['default'\\]"):
        lora_fx.set_scale_(gm, 2.0, adapter="nope")
    with pytest.raises(NotAdaptedError):
        lora_fx.enable_adapters_(model, False)
    with pytest.raises(ConfigError):
        lora_fx.set_scale_(gm, float("nan"))
    sd = lora_fx.lora_state_dict(gm)
    before = {k: v.clone() for k, v in sd.items()}
    bad = {"lora.default.weight.lora_A": torch.zeros(2, 5), "extra.lora.default.weight.lora_B": torch.zeros(1)}
    with pytest.raises(AdapterMismatchError) as e:
        lora_fx.load_adapter_values_(gm, bad)
    msg = str(e.value)
    assert "missing key 'lora.default.weight.lora_B'" in msg and "unexpected key" in msg
    assert all(torch.equal(before[k], v) for k, v in lora_fx.lora_state_dict(gm).items())


def test_disable_context_restores_on_error():
    _, gm, x = _case3()
    lora_fx.enable_adapters_(gm, True)
    with pytest.raises(RuntimeError):
        with lora_fx.control.disable_adapters(gm):
            assert lora_fx.sites(gm)[0].scaling == 0.0
            raise RuntimeError("boom")
    assert lora_fx.sites(gm)[0].scaling == 2.0


def test_adapter_name_from_other_key_is_mapped():
    _, gm, x = _case3()
    sd = {k.replace(".default.", ".other."): torch.ones_like(v) for k, v in lora_fx.lora_state_dict(gm).items()}
    lora_fx.load_adapter_values_(gm, sd, adapter="default")
    assert torch.equal(lora_fx.sites(gm)[0].lora_A, torch.ones(2, 8))


# --------------------------------------------------------------------------------------------
# rank change (CASES.md 4)


def test_case4_rank_change_with_reserved_rank_does_not_recompile():
    """CASES.md 4: with a reserved maximum rank, rank 4 -> 8 -> 4 -> 1 swaps never recompile."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    gm = randomize_(lora_fx.transform(model, rank=4, alpha=8))
    x = torch.randn(3, 8)
    before = gm(x)
    lora_fx.reserve_rank_(gm, 8)
    site = lora_fx.sites(gm)[0]
    assert site.lora_A.shape == (8, 8) and site.rank == 4 and site.scaling == 2.0
    # padding changes nothing: zero rows/columns only add exact zeros to each dot product, though a
    # longer inner dimension may change a BLAS's blocking (summation order): a few roundings
    assert_close(gm(x), before, ulps=8)

    cnt = _counter()
    compiled = torch.compile(gm, fullgraph=True, backend=cnt)
    assert_close(compiled(x), before)
    for r, alpha in ((8, 8.0), (4, 2.0), (1, 3.0)):
        A, B = torch.randn(r, 8), torch.randn(8, r)
        lora_fx.load_adapter_values_(gm, {"lora.default.weight.lora_A": A, "lora.default.weight.lora_B": B},
                                     alpha=alpha)
        assert lora_fx.sites(gm)[0].rank == r
        want = torch.nn.functional.linear(x, lora_weight(model.weight, A, B, alpha / r), model.bias)
        assert_close(compiled(x), want)
        assert_close(gm(x), want)
    assert cnt.frame_count == 1


def test_rank_above_capacity_is_refused_with_the_fix():
    _, gm, _ = _case3()
    with pytest.raises(AdapterMismatchError, match=r"reserve_rank_\(gm, 8\)"):
        lora_fx.load_adapter_values_(gm, {"lora.default.weight.lora_A": torch.randn(8, 8),
                                          "lora.default.weight.lora_B": torch.randn(8, 8)})
    with pytest.raises(ConfigError):
        lora_fx.reserve_rank_(gm, 1)


def test_reserved_padding_trains_as_rank_r():
    """Padding rows/columns get zero gradients, so an optimizer step keeps them zero and the
    padded adapter trains exactly like the unpadded one."""
    torch.manual_seed(0)
    model = nn.Linear(6, 5)
    plain = randomize_(lora_fx.transform(model, rank=2))
    padded = lora_fx.reserve_rank_(lora_fx.transform(model, rank=2), 5)
    lora_fx.load_adapter_values_(padded, lora_fx.lora_state_dict(plain))
    x = torch.randn(4, 6)
    for gm in (plain, padded):
        opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
        for _ in range(3):
            opt.zero_grad()
            gm(x).square().sum().backward()
            opt.step()
    a, b = lora_fx.sites(plain)[0], lora_fx.sites(padded)[0]
    assert torch.count_nonzero(b.lora_A[2:]) == 0 and torch.count_nonzero(b.lora_B[:, 2:]) == 0
    # the two runs differ only in the summation order of their gradients (a few roundings); AdamW's
    # update m / sqrt(v) keeps relative errors relative, and 3 steps of lr 0.1 on O(1) factors add
    # no amplification worth counting: the default fp32 tolerance
    assert_close(b.lora_A[:2], a.lora_A)
    assert_close(padded(x), plain(x))


def test_dora_adapter_hot_swap_without_recompile():
    torch.manual_seed(0)
    model = nn.Linear(8, 6)
    gm = lora_fx.transform(model, rank=2, use_dora=True)
    donor = randomize_(lora_fx.transform(model, rank=2, use_dora=True), seed=3)
    with torch.no_grad():
        lora_fx.sites(donor)[0].module.lora_magnitude.mul_(1.5)
    x = torch.randn(3, 8)
    cnt = _counter()
    compiled = torch.compile(gm, fullgraph=True, backend=cnt)
    compiled(x)
    lora_fx.load_adapter_values_(gm, lora_fx.lora_state_dict(donor))
    assert_close(compiled(x), donor(x))
    assert cnt.frame_count == 1
    sd = {k: v for k, v in lora_fx.lora_state_dict(donor).items() if "magnitude" not in k}
    with pytest.raises(AdapterMismatchError, match="DoRA magnitude"):
        lora_fx.load_adapter_values_(gm, sd)
