"""Per-expert adapters in transformers' Mixtral, Qwen3-MoE and OLMoE (tiny configs, default
settings otherwise), each with its three experts implementations (``grouped_mm``, the default;
``eager``, the data-dependent loop; ``batched_mm``): with the default front-end the model keeps its
classes, logits and gradients equal the functional reference, fold gives the plain model back, PEFT
files go both ways, and the kept experts compile fullgraph; the export front-end adapts the same
stacks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lora_fx

from _moe import hf_moe_model
from _reference import randomize_, reference_call
from _tolerance import assert_close

TARGETS = ["*.experts.gate_up_proj", "*.experts.down_proj"]
CONSUMER = {None: "grouped_mm", "eager": "linear", "batched_mm": "bmm"}


def _ids():
    return torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))


def _grads(out, ref, factors, seed=1):
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    for a, b in zip(torch.autograd.grad(out, factors, gy, retain_graph=True), torch.autograd.grad(ref, factors, gy)):
        assert_close(a, b, dtype=out.dtype)


@pytest.mark.parametrize("impl", [None, "eager", "batched_mm"], ids=["grouped_mm", "eager", "batched_mm"])
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "olmoe"])
def test_hf_moe_experts_exact(name, impl):
    model = hf_moe_model(name, impl=impl)
    ids = _ids()
    gm = lora_fx.transform(model, rank=3, targets=TARGETS)
    experts = gm.model.layers[0].mlp.experts
    assert type(gm) is type(model) and type(experts) is type(model.model.layers[0].mlp.experts)
    assert set(gm.state_dict()) - set(model.state_dict()) == {k for k in gm.state_dict() if ".lora." in k}
    sites = lora_fx.sites(gm)
    assert len(sites) == 4 and {(s.op, s.lowering) for s in sites} == {(f"experts:{CONSUMER[impl]}", "factored")}
    assert {tuple(s.lora_A.shape[:2]) for s in sites} == {(4, 3)}
    assert_close(gm(ids).logits, model(ids).logits)  # B = 0
    randomize_(gm, scale=0.3)
    factors = [p for s in sites for p in (s.lora_A, s.lora_B)]
    for mode in ("train", "eval"):
        gm.train(mode == "train")
        model.train(mode == "train")
        with warnings.catch_warnings():
            warnings.simplefilter("error", lora_fx.LoraFxWarning)  # no merged fallback
            out = gm(ids).logits
        ref = reference_call(model, gm, (ids,)).logits
        assert_close(out, ref)
        _grads(out, ref, factors)
    folded = lora_fx.fold(gm.eval())
    fexperts = folded.model.layers[0].mlp.experts
    assert type(fexperts) is type(experts) and "forward" not in fexperts.__dict__
    plain = hf_moe_model(name, impl=impl)
    plain.load_state_dict(folded.state_dict(), strict=True)
    assert_close(plain(ids).logits, reference_call(model.eval(), gm, (ids,)).logits)


def test_hf_moe_default_targets_report_the_stacks():
    """Default targets: attention projections are adapted, the expert stacks (and the router) are
    not, and ``left_out`` / the summary name every stack with the reason and the fix."""
    model = hf_moe_model("mixtral")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_fx.LoraFxWarning)  # the left-out warning
        gm = lora_fx.transform(model, rank=2)
    adapted = {s.param for s in lora_fx.sites(gm)}
    assert adapted and not any(".experts." in p for p in adapted)
    stacks = {e.param: e.reason for e in lora_fx.left_out(gm) if ".experts." in e.param}
    assert set(stacks) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    assert all("targets=" in why and "per-expert" in why for why in stacks.values())
    report = lora_fx.summary(gm, show=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in str(report)
    assert not any(".experts." in r["param"] for r in report.not_captured)  # a graph reads them: adaptable
    gm2 = lora_fx.transform(model, rank=2, targets=TARGETS)
    assert not any(".experts." in e.param for e in lora_fx.left_out(gm2))


def test_hf_moe_bf16():
    model = hf_moe_model("mixtral").to(torch.bfloat16)
    ids = _ids()
    gm = lora_fx.transform(model, rank=3, targets=TARGETS)
    randomize_(gm, scale=0.3)
    out = gm(ids).logits
    ref = reference_call(model, gm, (ids,)).logits
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, dtype=torch.bfloat16)


def test_hf_moe_experts_compile_fullgraph():
    """The kept experts (their instance forward: class forward with lazy weights) compile fullgraph
    on the default grouped_mm path; hot-swaps do not recompile and are seen."""
    import torch._dynamo.testing

    model = hf_moe_model("mixtral")
    gm = lora_fx.transform(model, rank=3, targets=TARGETS)
    randomize_(gm, scale=0.3)
    experts = gm.model.layers[0].mlp.experts
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(experts, backend=counter, fullgraph=True, dynamic=False)
    g = torch.Generator().manual_seed(2)
    h, idx = torch.randn(10, 32, generator=g), torch.randint(0, 4, (10, 2), generator=g)
    w = torch.rand(10, 2, generator=g)
    assert_close(compiled(h, idx, w), experts(h, idx, w))
    with torch.no_grad():
        lora_fx.sites(gm)[0].lora_B.mul_(2.0)
    assert_close(compiled(h, idx, w), experts(h, idx, w))
    assert counter.frame_count == 1


def test_hf_moe_adapter_lifecycle():
    """add / delete / own files / hot-swap on kept experts: a second adapter on the stacks, deleted
    again; the own file round trip; reserve_rank_ then a lower-rank load."""
    model = hf_moe_model("olmoe")
    ids = _ids()
    gm = lora_fx.transform(model, rank=3, targets=TARGETS)
    randomize_(gm, scale=0.3)
    before = gm(ids).logits.detach()
    lora_fx.add_adapter(gm, "other", rank=2, targets=["*.experts.down_proj"])
    assert {s.param for s in lora_fx.sites(gm) if s.adapter == "other"} == \
        {f"model.layers.{i}.mlp.experts.down_proj" for i in (0, 1)}
    lora_fx.delete_adapter(gm, "other")
    assert_close(gm(ids).logits, before)
    state = {k: v.clone() for k, v in lora_fx.lora_state_dict(gm).items()}
    again = lora_fx.transform(model, rank=3, targets=TARGETS)
    lora_fx.load_adapter_values_(again, state)
    assert_close(again(ids).logits, before)
    lora_fx.reserve_rank_(again, 5)
    assert_close(again(ids).logits, before)
    lora_fx.load_adapter_values_(again, state)  # rank 3 into capacity 5
    assert_close(again(ids).logits, before)


def test_hf_moe_peft_files_both_ways(tmp_path):
    peft = pytest.importorskip("peft")
    model = hf_moe_model("qwen3_moe")
    ids = _ids()
    gm = lora_fx.transform(model, rank=3, targets=TARGETS + ["*.q_proj.weight"],
                           rank_pattern={"*.layers.1.mlp.experts.down_proj": 5})
    randomize_(gm, scale=0.3)
    lora_fx.save_adapter(gm, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
        with torch.no_grad():
            assert_close(pm(ids).logits, gm(ids).logits)
        again = lora_fx.load_adapter(model, tmp_path / "ours")  # PEFT's file back into a plain model
    with torch.no_grad():
        assert_close(again(ids).logits, gm(ids).logits)
    assert type(again) is type(model)


@pytest.mark.parametrize("name", ["mixtral", "olmoe"])
def test_hf_moe_peft_all_linear_files_with_the_router_both_ways(name, tmp_path):
    """PEFT's ``all-linear`` on a MoE model also targets the router (``target_parameters``
    ``gate.weight``): its file loads into lora_fx to PEFT's logits, and a lora_fx adapter on the
    router and the experts is a file PEFT loads to lora_fx's logits."""
    peft = pytest.importorskip("peft")
    model = hf_moe_model(name)
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=3, lora_alpha=6, target_modules="all-linear", init_lora_weights=False)).eval()
        assert any(t.endswith("gate.weight") for t in pm.peft_config["default"].target_parameters)
        pm.save_pretrained(tmp_path / "peft")
        loaded = lora_fx.load_adapter(model, tmp_path / "peft")
    assert any(s.param.endswith("mlp.gate.weight") for s in lora_fx.sites(loaded))
    with torch.no_grad():
        assert_close(loaded(ids).logits, pm(ids).logits)

    gm = lora_fx.transform(model, rank=3, targets=TARGETS + ["*.mlp.gate.weight", "*.q_proj.weight"])
    randomize_(gm, scale=0.3)
    lora_fx.save_adapter(gm, tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
        again = lora_fx.load_adapter(model, tmp_path / "ours")
    with torch.no_grad():
        want = reference_call(model, gm, (ids,)).logits
        assert_close(gm(ids).logits, want)
        assert_close(back(ids).logits, want)
        assert_close(again(ids).logits, want)


def test_hf_moe_export_frontend():
    """The export front-end (example inputs) adapts the same stacks, factored, and equals the
    kept-class model."""
    model = hf_moe_model("mixtral")
    ids = _ids()
    kept = lora_fx.transform(model, rank=3, targets=TARGETS)
    randomize_(kept, scale=0.3)
    exported = lora_fx.transform(model, rank=3, targets=TARGETS, example_inputs=(ids,))
    lora_fx.load_adapter_values_(exported, lora_fx.lora_state_dict(kept))
    assert {(s.op, s.lowering) for s in lora_fx.sites(exported)} == {("experts:grouped_mm", "factored")}
    with torch.no_grad():
        assert_close(exported(ids).logits, kept(ids).logits)


def test_hf_moe_routing_on_kept_model():
    """Routing on a kept-class MoE model: attention adapters route per sample (each sample equals
    that adapter alone); an adapter on expert stacks is refused, naming its stacks."""
    model = hf_moe_model("mixtral")
    ids = _ids()
    gm = lora_fx.transform(model, rank=3, targets=TARGETS, adapter_name="experts")
    lora_fx.add_adapter(gm, "a", rank=2, targets=["*.q_proj.weight", "*.v_proj.weight"])
    lora_fx.add_adapter(gm, "b", rank=4, alpha=3.0, targets=["*.q_proj.weight"])
    randomize_(gm, scale=0.3)
    alone = {}
    for name in ("a", "b"):
        lora_fx.set_active_adapters(gm, [name])
        with torch.no_grad():
            alone[name] = gm(ids).logits
    with torch.no_grad(), lora_fx.route_adapters(gm, ["b", "a"]):
        routed = gm(ids).logits
    assert_close(routed[0], alone["b"][0])
    assert_close(routed[1], alone["a"][1])
    with pytest.raises(lora_fx.RoutingError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        with lora_fx.route_adapters(gm, ["experts", "a"]):
            gm(ids)


def test_hf_gpt_oss_transposed_stacks():
    """GPT-OSS stores its stacks ``(E, in, out)`` with per-expert biases: the probe finds them
    transposed, and the kept model equals the reference with ``W[e] + ΔW[e]ᵀ``."""
    import transformers as tf

    from _moe import TINY

    cfg = tf.GptOssConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                          layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(cfg).eval()
    ids = _ids()
    gm = lora_fx.transform(model, rank=3, targets=TARGETS)
    sites = lora_fx.sites(gm)
    assert len(sites) == 4 and all(s.module.transposed for s in sites)
    gate_up = next(s for s in sites if s.param.endswith("gate_up_proj"))
    assert tuple(gate_up.lora_A.shape) == (4, 3, 32) and tuple(gate_up.lora_B.shape) == (4, 96, 3)
    randomize_(gm, scale=0.3)
    out = gm(ids).logits
    ref = reference_call(model, gm, (ids,)).logits
    assert_close(out, ref)
    _grads(out, ref, [p for s in sites for p in (s.lora_A, s.lora_B)])


def test_hf_moe_gradient_checkpointing():
    """transformers' activation checkpointing around decoder layers that hold kept experts:
    the same loss and per-expert gradients."""
    model = hf_moe_model("qwen3_moe")
    ids = _ids()
    gm = lora_fx.transform(model, rank=3, targets=TARGETS).train()
    randomize_(gm, scale=0.3)
    factors = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    plain = gm(input_ids=ids, labels=ids).loss
    want = torch.autograd.grad(plain, factors)
    gm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert gm.model.gradient_checkpointing
    loss = gm(input_ids=ids, labels=ids).loss
    assert_close(loss, plain)
    for a, b in zip(torch.autograd.grad(loss, factors), want):
        assert_close(a, b)


@pytest.mark.parametrize("name", ["qwen2_moe", "granitemoe"])
def test_hf_other_moe_families(name):
    """More transformers MoE families with the same experts code: adapted per expert, factored,
    equal to the functional reference."""
    import transformers as tf

    from _moe import TINY

    if name == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                                shared_expert_intermediate_size=24)
        cls = tf.Qwen2MoeForCausalLM
    else:
        cfg, cls = tf.GraniteMoeConfig(**TINY, num_local_experts=4, num_experts_per_tok=2), tf.GraniteMoeForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = _ids()
    gm = lora_fx.transform(model, rank=3, targets=TARGETS)
    sites = lora_fx.sites(gm)
    assert len(sites) == 4 and {(s.op, s.lowering) for s in sites} == {("experts:grouped_mm", "factored")}
    randomize_(gm, scale=0.3)
    assert_close(gm(ids).logits, reference_call(model, gm, (ids,)).logits)
