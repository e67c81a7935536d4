"""Several named adapters: add (both lowerings, blocks), activate, mix, disable, delete — against
the functional reference ``W + Σ w·s·B@A`` built from the factors (tests/_reference.py)."""

import datetime
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import lora_fx
from _isolated import run_isolated
from _reference import randomize_, reference_call
from _tolerance import assert_close
from lora_fx import ConfigError, NotAdaptedError, TargetError


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.out(F.gelu(self.fc(x)))


class Net(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.emb = nn.Embedding(40, d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.head = nn.Linear(d, 5)

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


IDX = torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(0))


def _randomise(gm, name, seed):
    randomize_(gm, adapter=name, seed=seed, scale=0.2)


def _reference(model, gm, weights):
    """Output of ``model`` with ``W + Σ_name weights[name] · alpha_name/rank_name · B@A`` at every site."""
    return reference_call(model, gm, (IDX,), weights=weights)


def _two(lowering_a="auto", lowering_b="auto", **kw_b):
    model = Net()
    gm = lora_fx.transform(model, rank=2, alpha=3, lowering=lowering_a)
    lora_fx.add_adapter(gm, "b", rank=3, alpha=6, lowering=lowering_b, **kw_b)
    _randomise(gm, "default", 1)
    _randomise(gm, "b", 2)
    return model, gm


@pytest.mark.parametrize("low_a", ["factored", "merge"])
@pytest.mark.parametrize("low_b", ["factored", "merge"])
def test_add_adapter_chains_after_existing_nodes(low_a, low_b):
    model, gm = _two(low_a, low_b)
    assert {s.lowering for s in lora_fx.sites(gm) if s.adapter == "b"} <= {low_b}
    assert sorted({s.param for s in lora_fx.sites(gm) if s.adapter == "b"}) == \
        sorted({s.param for s in lora_fx.sites(gm) if s.adapter == "default"})
    for _, sub in gm.named_modules():
        if isinstance(sub, fx.GraphModule):
            sub.graph.lint()
    # the new adapter is added inactive: outputs are those of "default" alone
    assert_close(gm(IDX), _reference(model, gm, {"default": 1.0}))
    lora_fx.set_active_adapters(gm, ["default", "b"])
    assert not any(p.requires_grad for s in lora_fx.sites(gm) if s.adapter == "b" for p in (s.lora_A, s.lora_B))
    lora_fx.mark_only_lora_as_trainable(gm)  # train exactly the active adapters
    out = gm(IDX)
    assert_close(out, _reference(model, gm, {"default": 1.0, "b": 1.0}))
    params = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    g1 = torch.autograd.grad(out.square().sum(), params)
    g2 = torch.autograd.grad(_reference(model, gm, {"default": 1.0, "b": 1.0}).square().sum(), params)
    for a, b in zip(g1, g2):
        assert_close(a, b)
    folded = lora_fx.fold(gm)
    assert_close(folded(IDX), out.detach())


def test_switching_never_retraces_or_recompiles():
    model, gm = _two()
    codes = {n: m.code for n, m in gm.named_modules() if isinstance(m, fx.GraphModule)}
    compiles = []

    def backend(graph_module, example_inputs):
        compiles.append(1)
        return graph_module.forward

    compiled = torch.compile(gm, backend=backend)
    checks = [
        (lambda: lora_fx.set_active_adapters(gm, "default"), {"default": 1.0}),
        (lambda: lora_fx.set_active_adapters(gm, "b"), {"b": 1.0}),
        (lambda: lora_fx.set_active_adapters(gm, ["default", "b"]), {"default": 1.0, "b": 1.0}),
        (lambda: lora_fx.set_adapter_weights(gm, {"default": 0.3, "b": -0.7}), {"default": 0.3, "b": -0.7}),
        (lambda: lora_fx.set_active_adapters(gm, []), {}),
    ]
    with torch.no_grad():
        compiled(IDX)
        first = len(compiles)
        for change, weights in checks:
            change()
            assert_close(compiled(IDX), _reference(model, gm, weights))
            assert lora_fx.active_adapters(gm) == [n for n in ("default", "b") if n in weights]
    assert len(compiles) == first  # value changes only: no recompilation
    assert codes == {n: m.code for n, m in gm.named_modules() if isinstance(m, fx.GraphModule)}


def test_disable_context_manager_restores_state():
    model, gm = _two()
    lora_fx.set_adapter_weights(gm, {"default": 0.5, "b": 2.0})
    before = gm(IDX).detach()
    grads = {n: p.requires_grad for n, p in gm.named_parameters()}
    with lora_fx.disable_adapters(gm) as same:
        # the switch is off; the active set is separate state and stays
        assert same is gm and lora_fx.active_adapters(gm) == ["default", "b"]
        assert not any(a.enabled for s in lora_fx.sites(gm) for a in [s.module])
        assert_close(gm(IDX), model(IDX), ulps=0)
    assert torch.equal(gm(IDX), before)
    assert grads == {n: p.requires_grad for n, p in gm.named_parameters()}
    with pytest.raises(RuntimeError), lora_fx.disable_adapters(gm):  # restores on error too
        raise RuntimeError("boom")
    assert torch.equal(gm(IDX), before)


def test_weighted_combination_rules():
    model, gm = _two()
    lora_fx.add_adapter(gm, "c", rank=2, targets=["head.weight"])
    with pytest.raises(TargetError, match="only in 'default'"):
        lora_fx.set_adapter_weights(gm, {"default": 0.5, "c": 0.5})
    lora_fx.set_adapter_weights(gm, {"default": 0.5, "c": 0.5}, same_targets=False)
    with pytest.raises(ConfigError, match="unknown adapter"):
        lora_fx.set_adapter_weights(gm, {"zzz": 1.0})
    with pytest.raises(ConfigError, match="must be a number"):
        lora_fx.set_adapter_weights(gm, {"b": "1"})
    lora_fx.add_adapter(gm, "d", rank=2, use_dora=True)
    with pytest.raises(ConfigError, match="DoRA"):
        lora_fx.set_adapter_weights(gm, {"b": 0.5, "d": 0.5})


def test_sites_per_adapter_and_only_active_adapters_train():
    _, gm = _two()
    per = {}
    for s in lora_fx.sites(gm):
        per.setdefault(s.adapter, []).append(s.param)
    assert set(per) == {"default", "b"} and sorted(per["default"]) == sorted(per["b"])
    lora_fx.set_active_adapters(gm, "b")
    lora_fx.mark_only_lora_as_trainable(gm)
    train = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert train and all(".lora.b." in n or n.startswith("lora.b.") for n in train)
    assert sum(p.numel() for p in lora_fx.adapter_parameters(gm)) == \
        sum(s.lora_A.numel() + s.lora_B.numel() for s in lora_fx.sites(gm) if s.adapter == "b")


def test_delete_adapter_removes_nodes_and_modules():
    model, gm = _two("merge", "factored")
    lora_fx.set_active_adapters(gm, ["default", "b"])
    lora_fx.delete_adapter(gm, "b")
    assert lora_fx.adapter_names(gm) == ["default"]
    assert not [k for k in gm.state_dict() if ".lora.b." in k]
    for _, sub in gm.named_modules():
        if isinstance(sub, fx.GraphModule):
            sub.graph.lint()
            assert not [n for n in sub.graph.nodes if ".lora.b." in f".{n.target}"]
    assert_close(gm(IDX), _reference(model, gm, {"default": 1.0}))
    lora_fx.delete_adapter(gm, "default")
    assert not [k for k in gm.state_dict() if ".lora." in f".{k}"]
    assert_close(gm(IDX), model(IDX))
    with pytest.raises(NotAdaptedError):
        lora_fx.delete_adapter(gm, "default")


def test_add_adapter_errors_and_activate():
    model = Net()
    gm = lora_fx.transform(model, rank=2)
    with pytest.raises(ConfigError, match="already exists"):
        lora_fx.add_adapter(gm, "default", rank=2)
    with pytest.raises(ConfigError, match="unknown keyword"):
        lora_fx.add_adapter(gm, "x", rank=2, lora_alpha=3)
    with pytest.raises(ConfigError, match="identifier"):
        lora_fx.add_adapter(gm, "a.b", rank=2)
    with pytest.raises(TargetError):
        lora_fx.add_adapter(gm, "x", rank=2, targets=["nope.weight"])
    assert lora_fx.adapter_names(gm) == ["default"]  # failed adds leave nothing behind
    with pytest.raises(NotAdaptedError):
        lora_fx.add_adapter(model, "x", rank=2)
    lora_fx.add_adapter(gm, "x", rank=2, activate=True, targets=["head.weight"])
    assert lora_fx.active_adapters(gm) == ["default", "x"]
    assert all(p.requires_grad for p in lora_fx.adapter_parameters(gm))
    lora_fx.add_adapter(gm, "y", rank=2, targets=["head.weight"])
    assert lora_fx.active_adapters(gm) == ["default", "x"]
    assert not any(p.requires_grad for n, p in gm.named_parameters() if ".lora.y." in n)


def test_pissa_adapter_on_top_keeps_outputs():
    model, gm = _two()
    lora_fx.set_active_adapters(gm, "default")
    before = gm(IDX).detach()
    lora_fx.add_adapter(gm, "p", rank=2, init="pissa", targets=["head.weight"], activate=True)
    assert_close(gm(IDX), before)
    shared = lora_fx.transform(model, rank=2, copy_weights=False)
    with pytest.raises(ConfigError, match="copy_weights=False"):
        lora_fx.add_adapter(shared, "p", rank=2, init="pissa")


@pytest.mark.distributed
def test_ddp_with_inactive_adapter_find_unused_false():
    """CASES.md 5: DDP(find_unused_parameters=False) with a second, inactive adapter."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    _, gm = _two()
    lora_fx.set_active_adapters(gm, "default")
    lora_fx.mark_only_lora_as_trainable(gm)

    def body():  # in a child process with a deadline: a process group can hang in C++ (tests/_isolated.py)
        store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        ddp = DDP(gm, find_unused_parameters=False)
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            loss = ddp(IDX).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {name: (p.requires_grad, p.grad is not None) for name, p in gm.named_parameters()}

    for name, (requires_grad, has_grad) in run_isolated(body).items():
        active = ".lora.default." in f".{name}"
        assert requires_grad == active, name
        assert has_grad == active, name


@pytest.mark.filterwarnings("ignore::lora_fx.LoraFxWarning")
def test_rank_change_under_compile_recompiles_once_and_is_correct():
    """CASES.md 4: swapping in a rank-8 adapter after a rank-4 one edits the graph: one recompilation,
    then switching between them is free."""
    model = Net()
    gm = lora_fx.transform(model, rank=4)
    _randomise(gm, "default", 1)
    compiles = []

    def backend(graph_module, example_inputs):
        compiles.append(1)
        return graph_module.forward

    compiled = torch.compile(gm, backend=backend)
    with torch.no_grad():
        assert_close(compiled(IDX), _reference(model, gm, {"default": 1.0}))
        lora_fx.add_adapter(gm, "r8", rank=8)
        _randomise(gm, "r8", 3)
        lora_fx.set_active_adapters(gm, "r8")
        assert_close(compiled(IDX), _reference(model, gm, {"r8": 1.0}))
        after_add = len(compiles)
        lora_fx.set_active_adapters(gm, "default")
        assert_close(compiled(IDX), _reference(model, gm, {"default": 1.0}))
    assert after_add > 1 and len(compiles) == after_add
