"""Per-expert adapters on stacks of expert weights (MoE): the lazy weight, its lowering in captured
graphs, and the adapter lifecycle (targets, patterns, fold, add/delete, hot-swap, files).

Every numeric check is against the functional reference ``functional_call(model, {W: W + s·ΔW})``
with ``ΔW[e] = B[e] @ A[e]`` per expert (``tests/_reference.py``), non-zero random factors, ranks
that are not multiples of 4 (the grouped GEMM pads them)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.io.native import load_lora_state, save_lora_state
from lora_fx.lazy_weight import LoraWeight, probe

from _moe import E, H, I, K, LoopExperts, MoEBlock, gpt_oss_experts, mixtral_experts
from _reference import check_matches_reference, randomize_, reference_call
from _tolerance import assert_close

IMPLS = ("grouped_mm", "eager", "batched_mm")
STACKS = ["experts.gate_up_proj", "experts.down_proj"]


def _routing(n: int, dtype=torch.float32, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g).to(dtype)
    w, idx = torch.topk(torch.rand(n, E, generator=g).softmax(-1), K, dim=-1)
    return h, idx, w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
def test_lazy_weight_matches_functional_reference(impl, dtype):
    """Each transformers experts implementation, fed lazy weights, computes ``W[e] + s·B[e]@A[e]``:
    outputs and gradients (x, A, B) equal the merged-stack reference, with no merged fallback."""
    ex = mixtral_experts(impl, dtype=dtype)
    h, idx, w = _routing(10, dtype)
    g = torch.Generator().manual_seed(1)
    fac = {n: ((torch.randn(E, 3, d_in, generator=g) * 0.3).requires_grad_(),
               (torch.randn(E, d_out, 3, generator=g) * 0.3).requires_grad_(), torch.tensor(0.7))
           for n, d_out, d_in in (("gate_up_proj", 2 * I, H), ("down_proj", H, I))}
    hx, hr = (h.clone().requires_grad_() for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a merged fallback would warn
        out = torch.func.functional_call(ex, {n: LoraWeight(ex.get_parameter(n), ((a, b, s, None),))
                                              for n, (a, b, s) in fac.items()}, (hx, idx, w))
    ref = torch.func.functional_call(ex, {n: (ex.get_parameter(n).float() + s * b @ a).to(dtype)
                                          for n, (a, b, s) in fac.items()}, (hr, idx, w))
    gy = torch.randn(out.shape, generator=g).to(dtype)
    leaves = [t for a, b, _ in fac.values() for t in (a, b)]
    g1 = torch.autograd.grad(out, leaves + [hx], gy)
    g2 = torch.autograd.grad(ref, leaves + [hr], gy)
    assert_close(out, ref, dtype=dtype)
    assert_close(list(g1), list(g2), dtype=dtype)


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_orientation_comes_from_the_op(impl):
    """Mixtral's ``(E, out, in)`` stacks are consumed as stored; GPT-OSS's ``(E, in, out)`` stacks
    (``x @ W[e]``, ``grouped_mm(x, W)``) are transposed, found by the probe, not by a flag."""
    mix, oss = mixtral_experts(impl), gpt_oss_experts(impl)
    h, idx, w = _routing(2)
    assert probe(mix, "gate_up_proj", (h, idx, w))[0] is False
    assert probe(oss, "gate_up_proj", (h, idx, w))[0] is True
    block = MoEBlock(oss)
    gm = lora_fx.transform(block, rank=3, targets=STACKS, leaf_modules=["experts"])
    sites = {s.param: s for s in lora_fx.sites(gm)}
    assert sites["experts.gate_up_proj"].module.transposed
    assert tuple(sites["experts.gate_up_proj"].lora_A.shape) == (E, 3, H)       # (E, r, in)
    assert tuple(sites["experts.gate_up_proj"].lora_B.shape) == (E, 2 * I, 3)   # (E, out, r)
    randomize_(gm, scale=0.3)
    check_matches_reference(block, gm, (torch.randn(2, 5, H),))


@pytest.mark.parametrize("impl", IMPLS)
def test_kept_experts_leaf_in_a_traced_model(impl):
    """An experts module kept as a leaf of a torch.fx graph: per-expert factored adapters through
    ``module_call`` with lazy weights; outputs and gradients equal the reference, train and eval."""
    block = MoEBlock(mixtral_experts(impl))
    gm = lora_fx.transform(block, rank=5, alpha=7.0, targets=STACKS + ["in_proj.weight"], leaf_modules=["experts"])
    sites = {s.param: s for s in lora_fx.sites(gm)}
    assert sites["experts.gate_up_proj"].op == f"experts:{ {'eager': 'linear', 'batched_mm': 'bmm'}.get(impl, impl)}"
    assert {s.lowering for s in sites.values()} == {"factored"}
    assert tuple(sites["experts.down_proj"].lora_A.shape) == (E, 5, I)
    assert tuple(sites["experts.down_proj"].lora_B.shape) == (E, H, 5)
    x = torch.randn(2, 5, H)
    assert_close(gm(x), block(x))  # B = 0: the model it was
    randomize_(gm, scale=0.3)
    for mode in ("train", "eval"):
        getattr(gm, mode)()
        getattr(block, mode)()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_matches_reference(block, gm, (x,))


def test_traced_expert_loop_gets_per_expert_adapters():
    """A 3-D parameter read as ``F.linear(x, W[e])`` in a traced loop: found statically as a stack,
    not a default target, adapted per expert when named."""
    block = MoEBlock(LoopExperts())
    gm = lora_fx.transform(block, rank=3)
    assert not any(s.param.startswith("experts.") for s in lora_fx.sites(gm))
    gm = lora_fx.transform(block, rank=3, targets=["experts.*"])
    sites = {s.param: s for s in lora_fx.sites(gm)}
    assert sites["experts.w_in"].op == "experts:linear" and sites["experts.w_in"].lowering == "factored"
    assert tuple(sites["experts.w_in"].lora_A.shape) == (E, 3, H)
    randomize_(gm, scale=0.3)
    check_matches_reference(block, gm, (torch.randn(3, 4, H),))


def test_unknown_consumer_gets_the_merged_value_and_warns():
    """An op without a factored form reads ``W + ΔW`` (exact), warns once, and the site says merge."""

    class Summed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(E, 6, 5))
            self.num_experts = E

        def forward(self, x):
            return x @ torch.tanh(self.w).sum(0).T

    from lora_fx.rules import ModuleRule, probed_stack, register_module_rule
    register_module_rule(Summed, ModuleRule(kind=lambda m: "summed", stack=probed_stack(
        lambda m, w: (torch.randn(2, 5, dtype=w.dtype),))))
    model = nn.Sequential(Summed())
    gm = lora_fx.transform(model, rank=2, targets=["0.w"], leaf_modules=["0"])
    site = lora_fx.sites(gm)[0]
    assert site.lowering == "merge" and site.op == "experts:merge"
    randomize_(gm, scale=0.3)
    with pytest.warns(lora_fx.LoraFxWarning, match="tanh"):
        check_matches_reference(model, gm, (torch.randn(3, 5),))


def test_stacks_are_explicit_targets_with_patterns():
    """Stacks are not default targets; rank_pattern / alpha_pattern key one stack; DoRA and PiSSA on
    a stack are refused before anything changes."""
    block = MoEBlock(mixtral_experts())
    gm = lora_fx.transform(block, rank=4, leaf_modules=["experts"])
    assert {s.param for s in lora_fx.sites(gm)} == {"in_proj.weight", "router.weight"}
    gm = lora_fx.transform(block, rank=4, targets=["experts.*"], leaf_modules=["experts"],
                           rank_pattern={"experts.down_proj": 6}, alpha_pattern={"experts.down_proj": 3.0})
    sites = {s.param: s for s in lora_fx.sites(gm)}
    assert (sites["experts.down_proj"].rank, sites["experts.down_proj"].alpha) == (6, 3.0)
    assert sites["experts.gate_up_proj"].rank == 4
    for bad in (dict(use_dora=True), dict(init="pissa")):
        with pytest.raises(lora_fx.ConfigError, match="stacks of expert weights"):
            lora_fx.transform(block, rank=4, targets=["experts.*"], leaf_modules=["experts"], **bad)
        with pytest.raises(lora_fx.ConfigError, match="stacks of expert weights"):
            lora_fx.add_adapter(gm, "other", rank=2, targets=["experts.*"], **bad)
        assert lora_fx.adapter_names(gm) == ["default"]


def test_dropout_on_stacks_follows_train_and_eval():
    block = MoEBlock(mixtral_experts())
    gm = lora_fx.transform(block, rank=3, targets=STACKS, leaf_modules=["experts"], dropout=0.5)
    randomize_(gm, scale=0.3)
    x = torch.randn(2, 5, H)
    gm.eval()
    block.eval()
    assert_close(gm(x), reference_call(block, gm, (x,)))
    gm.train()
    torch.manual_seed(0)
    a = gm(x)
    torch.manual_seed(1)
    assert not torch.equal(a, gm(x))  # dropout draws on the experts' inputs in training


def test_fold_add_delete_and_hot_swap():
    block = MoEBlock(mixtral_experts())
    gm = lora_fx.transform(block, rank=3, targets=STACKS, leaf_modules=["experts"])
    randomize_(gm, scale=0.3)
    x = torch.randn(2, 5, H)
    want = reference_call(block, gm, (x,))
    folded = lora_fx.fold(gm)
    assert not any("lora" in k for k in folded.state_dict())
    assert_close(folded(x), want)
    plain = MoEBlock(mixtral_experts())  # fold's weights load strictly into the original class
    plain.load_state_dict(folded.state_dict(), strict=True)
    assert_close(plain(x), want)
    # a second adapter on the same stacks: the op sees W + ΔW_default + ΔW_other
    lora_fx.add_adapter(gm, "other", rank=2, targets=STACKS, activate=True)
    randomize_(gm, seed=5, scale=0.3, adapter="other")
    check_matches_reference(block, gm, (x,))
    lora_fx.delete_adapter(gm, "other")
    assert_close(gm(x), want)
    # hot-swap: reserve capacity 8, then load rank-5 values without new Parameters
    lora_fx.reserve_rank_(gm, 8)
    ids = {n: id(p) for n, p in gm.named_parameters()}
    g = torch.Generator().manual_seed(2)
    state = {k: torch.randn(v.shape[:-2] + (5, v.shape[-1]) if k.endswith("lora_A") else v.shape[:-1] + (5,),
                            generator=g) * 0.2 for k, v in lora_fx.lora_state_dict(gm).items()}
    lora_fx.load_adapter_values_(gm, state)
    assert {n: id(p) for n, p in gm.named_parameters()} == ids
    assert all(s.rank == 5 for s in lora_fx.sites(gm))
    check_matches_reference(block, gm, (x,))
    with pytest.raises(lora_fx.AdapterMismatchError, match=r"file has shape \(5, 32\), model has \(4, 8, 32\)"):
        lora_fx.load_adapter_values_(gm, {k: v[0] for k, v in state.items()})


def test_own_files_round_trip(tmp_path):
    block = MoEBlock(mixtral_experts())
    gm = lora_fx.transform(block, rank=3, targets=STACKS, leaf_modules=["experts"])
    randomize_(gm, scale=0.3)
    path = save_lora_state(gm, tmp_path / "experts.safetensors")
    again = load_lora_state(lora_fx.transform(block, rank=3, targets=STACKS, leaf_modules=["experts"]), path)
    x = torch.randn(2, 5, H)
    assert_close(again(x), gm(x), ulps=0)


def test_compiled_grouped_mm_one_graph_no_recompile_on_hot_swap():
    """``torch.compile(fullgraph=True)`` on the default grouped_mm experts: one graph, no break;
    new routings (inputs) and in-place changes of the factors and scaling reuse it and are seen."""
    import torch._dynamo.testing

    block = MoEBlock(mixtral_experts("grouped_mm"))
    gm = lora_fx.transform(block, rank=3, targets=STACKS, leaf_modules=["experts"])
    randomize_(gm, scale=0.3)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=False)
    for seed in range(3):  # three routings of the same shape
        x = torch.randn(2, 5, H, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        out = compiled(x)
        assert_close(out, gm(x))
        out.sum().backward()
    site = lora_fx.sites(gm)[0]
    with torch.no_grad():
        site.lora_B.mul_(3.0)
    lora_fx.set_scale_(gm, 0.5)
    assert_close(compiled(x), reference_call(block, gm, (x,)))
    assert counter.frame_count == 1
