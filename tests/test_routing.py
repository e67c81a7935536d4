"""A different adapter per sample: ``route_adapters`` against each adapter run alone on its samples
(outputs and gradients), both lowerings, compiled, and its errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
import lora_fx.ops_route

from _reference import randomize_
from _tolerance import assert_close


class Net(nn.Module):
    """Embedding (padding index) → fused qkv linear → conv → a flattened ``x.view(-1, d) @ W``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16, padding_idx=0)
        self.qkv = nn.Linear(16, 24)
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.w = nn.Parameter(torch.randn(16, 6) * 0.2)

    def forward(self, ids):
        q, k, v = self.qkv(self.emb(ids)).split(8, dim=-1)
        h = torch.tanh(q * k + v)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)          # (b, L, 16)
        return (h.reshape(-1, 16) @ self.w).view(ids.shape[0], -1, 6)  # rows flattened sample-major


def _model(seed: int = 0, **extra):
    torch.manual_seed(seed)
    net = Net()
    gm = lora_fx.transform(net, rank=2, alpha=3.0, lowering="factored",
                           fused={"qkv.weight": {"blocks": {"q": 8, "k": 8, "v": 8}, "enable": ("q", "v")}}, **extra)
    lora_fx.add_adapter(gm, "b", rank=5, alpha=2.0, lowering="factored", **extra)
    lora_fx.add_adapter(gm, "c", rank=3, alpha=7.0, targets=["qkv.weight", "w"], lowering="factored", **extra)
    randomize_(gm, scale=0.3)
    for s in lora_fx.sites(gm):  # add_adapter leaves new adapters frozen: train them all
        s.module.requires_grad_(True)
    return net, gm


NAMES = ["b", None, "default", "c", "b", "default", "b"]


def _alone(gm, ids, names, gy):
    """Each sample through its adapter alone (or the base model), and the summed gradients."""
    factors = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    outs, grads = [], [torch.zeros_like(p) for p in factors]
    for i, name in enumerate(names):
        lora_fx.set_active_adapters(gm, [] if name is None else [name])
        o = gm(ids[i:i + 1])
        outs.append(o.detach())
        for acc, g in zip(grads, torch.autograd.grad(o, factors, gy[i:i + 1], allow_unused=True)):
            if g is not None:
                acc += g
    lora_fx.set_active_adapters(gm, ["default"])
    return torch.cat(outs), grads


@pytest.mark.parametrize("algo_ratio", [100.0, 0.0], ids=["masked", "gather"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_routed_equals_each_adapter_alone(algo_ratio, mode, monkeypatch):
    """Ranks 2/5/3, alphas 3/2/7, a base sample, adapter "c" absent at three sites, a fused
    (per-block) weight, an embedding with a padding index, a conv and a flattened matmul: outputs
    and gradients equal each adapter alone on its samples; unused adapters get exact zeros."""
    monkeypatch.setattr(lora_fx.ops_route, "MASKED_MAX_RATIO", algo_ratio)
    _, gm = _model()
    getattr(gm, mode)()
    ids = torch.randint(0, 20, (len(NAMES), 5), generator=torch.Generator().manual_seed(1))
    ids[0, 0] = 0  # the padding index
    before = gm(ids)
    gy = torch.randn(before.shape, generator=torch.Generator().manual_seed(2))
    want, want_grads = _alone(gm, ids, NAMES, gy)
    lora_fx.set_adapter_weights(gm, {"default": 0.5, "b": 1.0}, same_targets=False)  # mixing ignored inside
    with lora_fx.route_adapters(gm, NAMES):
        out = gm(ids)
        factors = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
        grads = torch.autograd.grad(out, factors, gy)
    assert_close(out, want)
    for g, w in zip(grads, want_grads):
        assert_close(g, w)
    algos = {n.args[7] for n in gm.graph.nodes if n.target is lora_fx.ops_route.routed_delta}
    assert "gather" in algos if algo_ratio == 0.0 else algos == {"masked"}
    # unused adapters: exact-zero gradients
    with lora_fx.route_adapters(gm, ["b"] * len(NAMES)):
        out = gm(ids)
        grads = torch.autograd.grad(out.sum(), [s.lora_A for s in lora_fx.sites(gm)])
    for s, g in zip(lora_fx.sites(gm), grads):
        assert (g.abs().sum() == 0) == (s.adapter != "b"), s.param
    # outside the block: the mixing weights as before
    lora_fx.set_active_adapters(gm, ["default"])
    assert_close(gm(ids), before, ulps=0)


def test_routing_changes_no_value_outside_and_survives_add_delete_fold():
    net, gm = _model()
    ids = torch.randint(1, 20, (3, 4))
    lora_fx.set_adapter_weights(gm, {"default": 0.7, "c": 1.0}, same_targets=False)
    before = gm(ids)
    lora_fx.enable_routing_(gm)
    assert_close(gm(ids), before, ulps=0)
    lora_fx.add_adapter(gm, "d", rank=2, targets=["w"], lowering="factored")
    randomize_(gm, seed=4, adapter="d")
    with lora_fx.route_adapters(gm, ["d", "c", "d"]):
        routed = gm(ids)
    lora_fx.set_active_adapters(gm, ["d"])
    assert_close(routed[0], gm(ids)[0])
    lora_fx.delete_adapter(gm, "d")
    lora_fx.set_adapter_weights(gm, {"default": 0.7, "c": 1.0}, same_targets=False)
    assert_close(gm(ids), before, ulps=0)
    folded = lora_fx.fold(gm)
    assert not any(n.target is lora_fx.ops_route.routed_delta for n in folded.graph.nodes)
    assert_close(folded(ids), before)


def test_compiled_routing_one_graph_per_batch_size():
    """Different routings of one batch size reuse the compiled graph, and its output follows the
    routing; another batch size compiles once more."""
    import torch._dynamo.testing

    _, gm = _model()
    lora_fx.enable_routing_(gm)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(gm, backend=counter, fullgraph=True, dynamic=False)
    ids = torch.randint(1, 20, (4, 5), generator=torch.Generator().manual_seed(3))
    for names in (["b", "c", None, "default"], ["c", "c", "b", None], [None, "default", "default", "b"]):
        with lora_fx.route_adapters(gm, names):
            assert_close(compiled(ids), gm(ids))
    assert counter.frame_count == 1
    with lora_fx.route_adapters(gm, ["b", "c"]):
        assert_close(compiled(ids[:2]), gm(ids[:2]))
    assert counter.frame_count == 2


def test_dropout_draws_per_sample_adapter():
    """In training, a sample of an adapter without dropout is exact, one with dropout is not."""
    torch.manual_seed(0)
    gm = lora_fx.transform(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)), rank=4, dropout=0.5)
    lora_fx.add_adapter(gm, "dry", rank=3)
    randomize_(gm, scale=0.5)
    x = torch.randn(2, 64, 8)
    gm.eval()
    with lora_fx.route_adapters(gm, ["default", "dry"]):
        ref = gm(x)
    gm.train()
    with lora_fx.route_adapters(gm, ["default", "dry"]):
        got = gm(x)
    assert_close(got[1], ref[1])
    assert not torch.allclose(got[0], ref[0])


def test_errors_name_the_culprit():
    _, gm = _model()
    ids = torch.randint(1, 20, (3, 4))
    with pytest.raises(lora_fx.UnknownAdapterError, match=r"'nope'.*\['default', 'b', 'c'\]"):
        with lora_fx.route_adapters(gm, ["b", "nope", None]):
            pass
    with pytest.raises(lora_fx.RoutingError, match="one adapter name"):
        with lora_fx.route_adapters(gm, "b"):
            pass
    with pytest.raises(lora_fx.RoutingError, match=r"2 adapter names.*'emb.weight'.*3 rows"):
        with lora_fx.route_adapters(gm, ["b", "c"]):
            gm(ids)
    with lora_fx.route_adapters(gm, ["b", "c", None]):
        with pytest.raises(lora_fx.RoutingError, match="already active"):
            with lora_fx.route_adapters(gm, ["b", "c", None]):
                pass
    assert_close(gm(ids), gm(ids))  # the failed blocks left nothing behind
    # DoRA and merge-lowered sites are refused, naming the adapter and its sites
    lora_fx.add_adapter(gm, "dora", rank=2, targets=["qkv.weight"], use_dora=True, fused={"qkv.weight": None})
    lora_fx.add_adapter(gm, "merged", rank=2, targets=["conv.weight"], lowering="merge")
    for name, why in (("dora", "DoRA"), ("merged", r"'conv.weight' \(conv1d\): merge-lowered")):
        with pytest.raises(lora_fx.RoutingError, match=why):
            with lora_fx.route_adapters(gm, [name, "b", None]):
                pass
    # an unroutable adapter that no sample names adds nothing inside the block
    lora_fx.set_active_adapters(gm, ["merged", "b"])
    with lora_fx.route_adapters(gm, ["b", "b", "b"]):
        routed = gm(ids)
    lora_fx.set_active_adapters(gm, ["b"])
    assert_close(routed, gm(ids))


def test_expert_stacks_are_refused():
    from _moe import MoEBlock, mixtral_experts

    gm = lora_fx.transform(MoEBlock(mixtral_experts()), rank=2, targets=["experts.*", "in_proj.weight"],
                           leaf_modules=["experts"])
    with pytest.raises(lora_fx.RoutingError, match="experts.gate_up_proj.*stack of expert weights"):
        with lora_fx.route_adapters(gm, ["default"]):
            pass


def test_routed_sites_keep_input_recomputation():
    """A routed linear site whose input is a norm / GELU output still recomputes it in backward
    (the chain's ``remat`` spec moves to the routed node); gradients equal each adapter alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    gm = lora_fx.transform(model, rank=2)
    lora_fx.add_adapter(gm, "b", rank=3, alpha=5.0)
    randomize_(gm, scale=0.4)
    for s in lora_fx.sites(gm):
        s.module.requires_grad_(True)
    lora_fx.enable_routing_(gm)
    routed = [n for n in gm.graph.nodes if n.target is lora_fx.ops_route.routed_delta]
    assert len(routed) == 2 and all(n.kwargs.get("remat") for n in routed)
    x = torch.randn(3, 5, 8, requires_grad=True)
    names = ["b", "default", "b"]
    gy = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    want, want_grads = _alone(gm, x.detach(), names, gy)
    with lora_fx.route_adapters(gm, names):
        out = gm(x)
    grads = torch.autograd.grad(out, [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)], gy)
    assert_close(out, want)
    for g, w in zip(grads, want_grads):
        assert_close(g, w)
