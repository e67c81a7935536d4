"""The regions front-end on plain PyTorch models: which modules become regions and which are kept,
the model keeping its class, exactness against the functional reference, copies and pickles, the
instance forward, adapters added and deleted, tied weights registered once, and fold giving the
plain model back."""

from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import lora_fx
from lora_fx import state
from lora_fx.errors import TraceError
from lora_fx.regions import InstanceForward, RegionForward

from _checks import assert_unchanged, snapshot
from _reference import randomize_, reference_call
from _tolerance import assert_close


class Gate(nn.Module):
    """A value-dependent branch: torch.fx cannot trace it, its Python is kept."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return self.fc(-x)


class Block(nn.Module):
    """Simple signature; its ``gate`` child fails to trace and becomes a leaf."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 8)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(x + self.down(F.gelu(self.up(x))))


class Attn(nn.Module):
    """Optional arguments: kept, its projections become regions."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8, bias=False)

    def forward(self, x, mask=None, scale: float = 1.0):
        s = self.q(x) @ self.k(x).transpose(-1, -2) * scale
        if mask is not None:
            s = s.masked_fill(mask, -1e4)
        return s.softmax(-1) @ x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.attn = Attn()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 5)

    def forward(self, idx, mask=None):
        h = self.attn(self.emb(idx), mask=mask)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx, temperature=None):  # kept: emb, mid and head are regions of their own
        return self.head(torch.tanh(self.mid(self.emb(idx))))


def _idx(seed=0):
    return torch.randint(0, 10, (3, 4), generator=torch.Generator().manual_seed(seed))


def _captured(gm):
    return {p: state.capture_of(m) for p, m in gm.named_modules() if state.capture_of(m) is not None}


def test_modules_keep_their_class_and_each_is_captured_or_kept_with_a_reason():
    torch.manual_seed(0)
    model = Net()
    snap = snapshot(model)
    gm = lora_fx.transform(model, rank=2)
    assert_unchanged(model, snap)
    assert type(gm) is Net and state.frontend_of(gm) == "regions"
    assert all(type(gm.get_submodule(n)) is type(m) for n, m in model.named_modules())
    how = _captured(gm)
    assert how[""].startswith("kept: forward has optional or variadic arguments (mask)")
    assert how["attn"] == "kept: forward has optional or variadic arguments (mask, scale)"
    assert how["blocks"] == "kept: a container without forward"
    assert how["blocks.0"] == how["blocks.1"] == "fx (leaves: gate)"
    assert how["blocks.0.gate"].startswith("kept: test_regions.py:") and "x.sum() > 0" in how["blocks.0.gate"]
    for p in ("emb", "attn.q", "attn.k", "head", "blocks.0.gate.fc"):
        assert how[p] == "fx"
    assert "blocks.0.up" not in how  # inside the block's region
    assert {s.param for s in lora_fx.sites(gm)} == {n for n, p in model.named_parameters() if p.ndim == 2}
    # the site table says where each site's graph came from
    rows = {r["site"]: r["captured"] for r in lora_fx.summary(gm, show=False).rows}
    assert rows["blocks.1.up.weight"] == "fx (leaves: gate)" and rows["attn.q.weight"] == "fx"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [False, True])
def test_outputs_and_gradients_match_the_functional_reference(dtype, train):
    torch.manual_seed(0)
    model = Net().to(dtype).train(train)
    gm = randomize_(lora_fx.transform(model, rank=3, alpha=5), scale=0.3)
    idx, mask = _idx(), torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(2)) > 0.7
    out = gm(idx, mask=mask)
    ref = reference_call(model, gm, (idx,), {"mask": mask})
    assert out.dtype == dtype
    assert_close(out, ref, dtype=dtype)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    factors = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    for a, b in zip(torch.autograd.grad(out, factors, gy), torch.autograd.grad(ref, factors, gy)):
        assert_close(a, b, dtype=dtype)


def test_region_forward_is_an_instance_attribute_bound_to_its_module():
    gm = lora_fx.transform(Net(), rank=2)
    q = gm.attn.q
    assert type(q) is nn.Linear and isinstance(q.forward, RegionForward) and q.forward.__self__ is q
    assert isinstance(state.region_of(q), fx.GraphModule) and state.region_of(gm.attn) is None
    assert str(inspect.signature(q.forward)) == "(input: torch.Tensor) -> torch.Tensor"
    assert q(input=torch.ones(2, 8)).shape == (2, 8)  # the class forward's argument name works
    seen = []
    q.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    gm(_idx())
    assert seen == [(3, 4, 8)]  # hooks on a region fire: it is called through nn.Module.__call__
    assert set(gm.state_dict()) == set(Net().state_dict()) | {k for k in gm.state_dict() if ".lora." in k}


def test_copies_pickles_and_saves_run_on_their_own_modules():
    torch.manual_seed(0)
    model = Net()
    gm = randomize_(lora_fx.transform(model, rank=2))
    want = gm(_idx())
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm)), torch.load(buf, weights_only=False)):
        assert type(other) is Net
        assert_close(other(_idx()), want, ulps=0)
        q = other.attn.q
        assert q.forward.__self__ is q and state.region_of(q).get_parameter("weight") is q.weight
        with torch.no_grad():  # the copy's adapter is its own
            other.attn.q.lora["default"]["weight"].lora_B.add_(1.0)
        assert not torch.equal(other(_idx()), want)
    assert_close(gm(_idx()), want, ulps=0)


def test_regions_read_the_live_module_after_a_parameter_is_replaced():
    torch.manual_seed(0)
    gm = lora_fx.transform(Net(), rank=2)
    head = gm.head
    new = nn.Parameter(torch.randn_like(head.weight), requires_grad=False)
    head.weight = new  # what FSDP2 and load_state_dict(assign=True) do
    assert state.region_of(head).get_parameter("weight") is new
    x = torch.randn(2, 8)
    assert_close(head(x), F.linear(x, new, head.bias))  # B = 0: the live weight, no stale copy


def test_add_set_active_and_delete_adapters_rewrite_the_regions():
    torch.manual_seed(0)
    model = Net()
    gm = randomize_(lora_fx.transform(model, rank=2))
    version = state.region_of(gm.head).code_version
    lora_fx.add_adapter(gm, "other", rank=3, targets=["head.weight", "blocks.*.up.weight"], activate=True)
    assert state.region_of(gm.head).code_version > version
    randomize_(gm, adapter="other", seed=5)
    assert lora_fx.active_adapters(gm) == ["default", "other"]
    assert_close(gm(_idx()), reference_call(model, gm, (_idx(),)))
    lora_fx.set_active_adapters(gm, "other")
    assert_close(gm(_idx()), reference_call(model, gm, (_idx(),), weights={"other": 1.0}))
    lora_fx.delete_adapter(gm, "other")
    assert lora_fx.adapter_names(gm) == ["default"] and list(gm.head.lora) == ["default"]
    lora_fx.set_active_adapters(gm, "default")
    assert_close(gm(_idx()), reference_call(model, gm, (_idx(),)))


def test_a_tied_weight_gets_one_adapter_registered_once():
    torch.manual_seed(0)
    model = Tied()
    gm = randomize_(lora_fx.transform(model, rank=2, targets=["emb.weight", "head.weight", "mid.weight"],
                                      frontend="regions"))
    site = next(s for s in lora_fx.sites(gm) if s.param == "emb.weight")
    assert site.aliases == ("emb.weight", "head.weight")
    assert "lora" not in gm.head._modules and gm.head.lora["default"]["weight"] is site.module
    keys = [k for k in gm.state_dict() if ".lora." in k]
    assert sorted(keys) == sorted(f"{m}.lora.default.weight.{f}" for m in ("emb", "mid") for f in ("lora_A", "lora_B"))
    idx = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    assert_close(gm(idx), reference_call(model, gm, (idx,)))
    state_dict = lora_fx.lora_state_dict(gm)
    fresh = lora_fx.transform(model, rank=2, targets=["emb.weight", "head.weight", "mid.weight"], frontend="regions")
    lora_fx.load_adapter_values_(fresh, state_dict)
    assert_close(fresh(idx), gm(idx), ulps=0)
    folded = lora_fx.fold(gm)
    assert folded.head.weight is folded.emb.weight  # still tied, folded once
    assert_close(folded(idx), gm(idx))
    lora_fx.delete_adapter(gm, "default")
    assert "lora" not in gm.head.__dict__ and not lora_fx.state.is_adapted(gm)


def test_fold_gives_the_plain_model_back():
    torch.manual_seed(0)
    model = Net()
    gm = randomize_(lora_fx.transform(model, rank=2))
    want = gm(_idx())
    folded = lora_fx.fold(gm)
    assert type(folded) is Net and not lora_fx.state.is_adapted(folded)
    for m in folded.modules():
        assert not isinstance(m.__dict__.get("forward"), InstanceForward)
        assert state.capture_of(m) is None and "lora" not in m._modules and "lora" not in m.__dict__
    assert state.frontend_of(folded) is None and not hasattr(folded, state.CONFIG_ATTR)
    plain = Net()
    plain.load_state_dict(folded.state_dict(), strict=True)
    assert_close(plain(_idx()), want)
    assert_close(gm(_idx()), want, ulps=0)  # gm unchanged


def test_frontend_regions_on_a_model_fx_traces_whole_and_errors():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    gm = lora_fx.transform(mlp, rank=2, frontend="regions")
    assert type(gm) is nn.Sequential and state.capture_of(gm) == "fx"  # the root itself is a region
    assert isinstance(lora_fx.transform(mlp, rank=2), fx.GraphModule)  # "auto": fx on the whole model

    class OwnWeights(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x, flip=False):
            return x @ (self.w.t() if flip else self.w)

    with pytest.raises(TraceError, match=r"frontend='regions' found no module of OwnWeights.*optional or variadic"):
        lora_fx.transform(OwnWeights(), rank=2, frontend="regions")


def test_leaf_modules_and_weights_no_graph_reads_are_reported():
    torch.manual_seed(0)

    class Expert(nn.Module):  # its own weight is read by its own (kept) Python
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8, 8))

        def forward(self, x, k=1):
            return x @ self.w[k]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.expert = Expert()
            self.other = nn.Linear(8, 8)

        def forward(self, x, k=1):
            return self.other(self.expert(self.proj(x), k))

    gm = lora_fx.transform(Model(), rank=2, leaf_modules=["other"], frontend="regions")
    table = lora_fx.summary(gm, show=False)
    assert [r["site"] for r in table.rows] == ["proj.weight"]
    assert {r["module"]: r["captured"] for r in table.captured}["other"] == "kept: named in leaf_modules"
    assert [(r["param"], r["weight shape"]) for r in table.not_captured] == [("expert.w", (3, 8, 8)),
                                                                            ("other.weight", (8, 8))]
    text = str(table)
    assert "captured: 1 region(s)" in text and "expert.w 3x8x8: kept: forward has optional" in text


def test_draw_a_model_that_kept_its_class(tmp_path):
    gm = lora_fx.transform(Net(), rank=2)
    path = lora_fx.draw(gm, tmp_path / "regions.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("options", [dict(lowering="merge"), dict(use_dora=True), dict(init="pissa"),
                                     dict(dropout=0.1), dict(use_rslora=True, rank_pattern={"head.weight": 3})],
                         ids=["merge", "dora", "pissa", "dropout", "rslora-rank_pattern"])
def test_configurations_in_regions(options):
    torch.manual_seed(0)
    model = Net()
    gm = lora_fx.transform(model, rank=2, **options)
    if options.get("init") != "pissa":
        randomize_(gm, scale=0.3, magnitude=0.5)
    gm.eval()
    out = gm(_idx())
    base = {n: p for n, p in gm.named_parameters() if ".lora." not in n} if "init" in options else None
    assert_close(out, reference_call(model, gm, (_idx(),), base=base))
    assert_close(lora_fx.fold(gm)(_idx()), out)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):  # torch.fx stores the tensor on the module as `_tensor_constant0`
        return self.fc(x) * torch.tensor([2.0, 1.0, 1.0, 3.0])


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = Scale()

    def forward(self, x, flag=None):
        return self.s(x)


def test_a_region_with_a_tensor_constant_copies_pickles_and_folds_clean():
    torch.manual_seed(0)
    model = Scaled()
    gm = randomize_(lora_fx.transform(model, rank=2, frontend="regions"))
    assert state.capture_of(gm.s) == "fx" and type(gm) is Scaled
    x = torch.randn(2, 4)
    want = gm(x)
    for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert_close(other(x), want, ulps=0)
    folded = lora_fx.fold(gm)
    assert sorted(folded.s.__dict__) == sorted(model.s.__dict__)
    assert_close(folded(x), want)
