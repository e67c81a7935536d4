"""The torch.export front-end (lora_fx/passes/export.py) and the ATen site rules (lora_fx/rules.py)."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import lora_fx
from _reference import randomize_, reference_call
from _tolerance import assert_close
from lora_fx.errors import ConfigError, TraceError


class Conv1D(nn.Module):
    """GPT-2's Conv1D: ``W: (in, out)``, ``y = addmm(b, x, W)``."""

    def __init__(self, nin, nout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nin, nout) * 0.2)
        self.bias = nn.Parameter(torch.randn(nout) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d + 3)
        self.out = nn.Linear(d + 3, d, bias=False)

    def forward(self, x):
        return x + self.out(F.gelu(self.fc(x)))


class AtenNet(nn.Module):
    """Every ATen site kind; the shape branch defeats torch.fx (so ``auto`` falls back to export)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 12, padding_idx=0)
        self.conv = nn.Conv1d(12, 10, 3, padding=1)
        self.c1d = Conv1D(10, 14)
        self.lin = nn.Linear(14, 6)
        self.blocks = nn.ModuleList([Block(6), Block(6)])
        self.proj = nn.Parameter(torch.randn(5, 6) * 0.3)

    def forward(self, idx):
        h = self.emb(idx)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = self.lin(torch.tanh(self.c1d(h)))
        if h.shape[1] > 3:  # torch.fx: "symbolically traced variables cannot be used as inputs to control flow"
            h = h * 0.5
        for b in self.blocks:
            h = b(h)
        return h @ self.proj.t()


def _is_lora(key):
    return key.startswith("lora.") or ".lora." in key


def _randomize(gm, seed=1):
    randomize_(gm, seed=seed, scale=0.3)


@pytest.fixture(scope="module")
def aten_case():
    torch.manual_seed(0)
    model = AtenNet()
    idx = torch.randint(0, 20, (2, 7))
    gm = lora_fx.transform(model, rank=3, alpha=6, example_inputs=(idx,))
    return model, gm, idx


def test_auto_falls_back_to_export_and_keeps_names(aten_case):
    model, gm, _ = aten_case
    assert gm.meta["lora_fx_frontend"] == "export"
    keys = set(gm.state_dict())
    assert {k for k in keys if not _is_lora(k)} == set(model.state_dict())
    assert {s.param: s.op for s in lora_fx.sites(gm)} == {
        "emb.weight": "embedding", "conv.weight": "conv1d", "c1d.weight": "addmm", "lin.weight": "linear",
        "blocks.0.fc.weight": "linear", "blocks.0.out.weight": "linear", "blocks.1.fc.weight": "linear",
        "blocks.1.out.weight": "linear", "proj": "matmul (via view)"}
    # blocks stay called submodules, each its own GraphModule
    assert isinstance(gm.blocks, nn.ModuleList)
    assert all(isinstance(b, fx.GraphModule) for b in gm.blocks)
    assert [n.target for n in gm.graph.nodes if n.op == "call_module" and n.target.startswith("blocks")] == [
        "blocks.0", "blocks.1"]
    for _, m in lora_fx.passes.trace.graph_modules(gm):
        m.graph.lint()
        assert ".data" not in m.code


def test_outputs_and_gradients_match_functional_reference(aten_case):
    model, gm0, idx = aten_case
    gm = copy.deepcopy(gm0)
    _randomize(gm)
    for batch in (idx, torch.randint(0, 20, (8, 9))):  # captured with batch 2, runs with 8 (dynamic shapes)
        out = gm(batch)
        ref = reference_call(model, gm, (batch,))
        assert_close(out, ref)
        sites = lora_fx.sites(gm)
        factors = [p for s in sites for p in (s.lora_A, s.lora_B)]
        g_out = torch.autograd.grad(out.square().sum(), factors)
        g_ref = torch.autograd.grad(ref.square().sum(), factors)
        for a, b in zip(g_out, g_ref):
            assert_close(a, b)
    assert all(not p.requires_grad for n, p in gm.named_parameters() if not _is_lora(n))


def test_training_helpers_fold_and_pickle_on_export_result(aten_case):
    model, gm0, idx = aten_case
    gm = copy.deepcopy(gm0)
    _randomize(gm, seed=2)
    lora_fx.mark_only_lora_as_trainable(gm, bias="lora_only")
    assert gm.lin.bias.requires_grad and not gm.lin.weight.requires_grad
    sd = lora_fx.lora_state_dict(gm)
    assert sd and all(_is_lora(k) for k in sd)
    fresh = copy.deepcopy(gm0)
    fresh.load_state_dict(sd, strict=False)
    assert_close(fresh(idx), gm(idx))
    folded = lora_fx.fold(gm)
    assert not any(_is_lora(k) for k in folded.state_dict())
    plain = AtenNet()
    plain.load_state_dict(folded.state_dict(), strict=True)  # torchtune's fold test
    assert_close(plain(idx), gm(idx))
    again = pickle.loads(pickle.dumps(gm))
    assert_close(again(idx), gm(idx))


class ModeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.attn = nn.MultiheadAttention(8, 2, dropout=0.25, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.bn(self.conv(x)).flatten(2).transpose(1, 2)
        h = self.drop(h)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a.mean(1))


def test_train_eval_follow_mode_on_export_graphs():
    torch.manual_seed(0)
    model = ModeNet().train()
    x = torch.randn(2, 3, 4, 4)
    gm = lora_fx.transform(model, rank=2, frontend="export", example_inputs=(x,))
    assert gm.training and gm.meta["lora_fx_frontend"] == "export"
    twin = copy.deepcopy(model)  # the reference: the original model in the same modes, same RNG
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    for _ in range(2):
        torch.manual_seed(5)
        want = twin.train()(x)
        torch.manual_seed(5)
        got = gm.train()(x)
        assert_close(got, want)  # same dropout masks, batch statistics
    assert_close(gm.bn.running_mean, twin.bn.running_mean)
    assert int(gm.bn.num_batches_tracked) == int(twin.bn.num_batches_tracked) == 2
    assert not torch.equal(gm.bn.running_mean, before["bn.running_mean"])
    gm.eval(), twin.eval()
    assert not any(m.training for m in gm.modules())
    with torch.no_grad():
        e1, e2 = gm(x), gm(x)
        assert_close(e1, twin(x))
    assert torch.equal(e1, e2)  # dropout, attention dropout off; running stats used
    assert int(gm.bn.num_batches_tracked) == 2  # not counted in eval
    torch.manual_seed(6)
    t1 = gm.train()(x)
    torch.manual_seed(7)
    t2 = gm(x)
    assert not torch.equal(t1, t2)  # dropout back on
    assert not model.bn.num_batches_tracked  # the user's model is untouched


def test_mode_switches_keep_outputs_case1():
    """CASES.md 1 on the export front-end: non-square and square embeddings, a linear."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.e1 = nn.Embedding(100, 32)
            self.e2 = nn.Embedding(32, 32)
            self.fc = nn.Linear(64, 32)

        def forward(self, i, j):
            return self.fc(torch.cat([self.e1(i), self.e2(j)], -1))

    torch.manual_seed(0)
    net = Net()
    i, j = torch.randint(0, 100, (3, 5)), torch.randint(0, 32, (3, 5))
    gm = lora_fx.transform(net, rank=4, frontend="export", example_inputs=(i, j))
    _randomize(gm)
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    outs = [gm.train()(i, j), gm.eval()(i, j), gm.train()(i, j)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in weights.items())
    assert_close(outs[0], reference_call(net, gm, (i, j)))


def test_auto_uses_fx_when_it_traces():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    gm = lora_fx.transform(model, rank=2, example_inputs=(torch.randn(3, 4),))
    assert gm.meta["lora_fx_frontend"] == "fx"


# ------------------------------------------------------------------------------------------ bad input


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[1] > 8:
            return self.fc(x[:, :4])
        return self.fc(x)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # depends on values: neither front-end can capture it
            return self.fc(x)
        return -self.fc(x)


class OwnBranchy(nn.Module):
    """Its weight is read by its own (untraceable) forward: nothing to capture on its own."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        if x.shape[1] > 8:
            return x[:, :4] @ self.w
        return x @ self.w


def test_auto_without_example_inputs_keeps_the_class_or_says_to_pass_them():
    model = Branchy()
    kept = lora_fx.transform(model, rank=2)  # fx fails on the root: its Python stays, fc is a region
    assert type(kept) is Branchy and lora_fx.state.frontend_of(kept) == "regions"
    gm = lora_fx.transform(model, rank=2, example_inputs=(torch.randn(2, 4),))
    assert gm.meta["lora_fx_frontend"] == "export"
    with pytest.raises(TraceError, match=r"example_inputs=\(x,\)") as info:
        lora_fx.transform(OwnBranchy(), rank=2)
    assert "OwnBranchy" in str(info.value)


def test_both_front_ends_fail_one_error_shortest_first():
    model = DataDependent()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TraceError) as info:
        lora_fx.transform(model, rank=2, example_inputs=(torch.randn(2, 4),))
    msg = str(info.value)
    assert msg.startswith("neither front-end could capture DataDependent")
    lines = [ln for ln in msg.splitlines() if ln.startswith("[torch.")]
    assert {ln.split("]")[0] for ln in lines} == {"[torch.fx", "[torch.export"}
    tags = sorted(["[torch.fx] ", "[torch.export] "], key=msg.index)
    end = msg.rindex("\nHow to fix: for torch.fx")
    first = msg[msg.index(tags[0]) + len(tags[0]):msg.index(tags[1])]
    second = msg[msg.index(tags[1]) + len(tags[1]):end]
    assert len(first.strip()) <= len(second.strip())  # shortest failure printed first
    assert "x.sum() > 0" in msg and "How to fix" in msg
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kwargs, needle", [
    (dict(example_inputs=[torch.randn(2, 4)]), "must be a tuple"),
    (dict(example_inputs=(torch.randn(2, 4), torch.randn(2, 4))), "too many positional"),
    (dict(example_inputs=(torch.randn(2, 4),), example_kwargs={"mask": torch.ones(2)}), "mask"),
    (dict(example_inputs=(), example_kwargs=None, frontend="export"), "needs example inputs"),
    (dict(example_inputs=(torch.randn(2, 4),), frontend="onnx"), "frontend must be one of"),
])
def test_wrong_example_structure_names_the_mismatch(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        lora_fx.transform(Branchy(), rank=2, **kwargs)


class Reused(nn.Module):
    """One Linear called twice, behind a shape branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 1:
            x = x * 2
        return self.fc(torch.relu(self.fc(x)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reused_module_and_bf16_against_reference(dtype):
    torch.manual_seed(0)
    model = Reused().to(dtype)
    x = torch.randn(3, 4, dtype=dtype)
    gm = lora_fx.transform(model, rank=2, frontend="export", example_inputs=(x,))
    _randomize(gm)
    (site,) = lora_fx.sites(gm)  # one adapter, both calls see it
    out = gm(x)
    assert out.dtype == dtype
    ref = reference_call(model, gm, (x,))
    assert_close(out, ref, dtype=dtype)
    if dtype == torch.float32:
        ga = torch.autograd.grad(out.sum(), [site.lora_A, site.lora_B])
        gr = torch.autograd.grad(ref.sum(), [site.lora_A, site.lora_B])
        for a, b in zip(ga, gr):
            assert_close(a, b)


def test_factored_embedding_padding_row_gets_no_gradient_fx_path():
    """The padding row of W + ΔW gets no gradient, so neither may lora_A nor lora_B through it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6, padding_idx=0), nn.Linear(6, 3))
    gm = lora_fx.transform(model, rank=2, targets=["0.weight"], frontend="fx")
    _randomize(gm)
    (site,) = lora_fx.sites(gm)
    assert site.lowering == "factored"
    idx = torch.tensor([[0, 3, 0, 7], [2, 0, 9, 9]])
    out = gm(idx)
    ref = reference_call(model, gm, (idx,))
    assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.square().sum(), [site.lora_A, site.lora_B]),
                    torch.autograd.grad(ref.square().sum(), [site.lora_A, site.lora_B])):
        assert_close(a, b)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_embedding_scale_grad_by_freq_factored_matches_reference(frontend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6, scale_grad_by_freq=True), nn.Linear(6, 3))
    idx = torch.tensor([[1, 3, 1, 1], [2, 3, 9, 9]])
    gm = lora_fx.transform(model, rank=2, targets=["0.weight"], frontend=frontend, example_inputs=(idx,))
    _randomize(gm)
    (site,) = lora_fx.sites(gm)
    assert site.lowering == "factored"  # ops.embedding_delta re-weights A's gradient per position
    out = gm(idx)
    ref = reference_call(model, gm, (idx,))
    assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.square().sum(), [site.lora_A, site.lora_B]),
                    torch.autograd.grad(ref.square().sum(), [site.lora_A, site.lora_B])):
        assert_close(a, b)
