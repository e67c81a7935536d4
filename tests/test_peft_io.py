"""PEFT adapter files against the real ``peft`` package: save → ``PeftModel.from_pretrained`` and
PEFT ``save_pretrained`` → :func:`lora_fx.load_adapter`, for Linear, Embedding (non-square and
square), Conv2d and transformers' GPT-2 ``Conv1D`` layouts; mismatch errors (CASES.md 2)."""

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import AdapterFileError, AdapterMismatchError, ConfigError, UnsupportedSiteError
from _reference import randomize_, reference_call
from _tolerance import assert_close, assert_not_close

peft = pytest.importorskip("peft")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out:UserWarning")


class Mixed(nn.Module):
    """Every PEFT LoRA layout: Linear, non-square and square Embedding, Conv2d, GPT-2 Conv1D."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 12)
        self.pos = nn.Embedding(12, 12)
        self.c_attn = Conv1D(20, 12)  # GPT-2 layout: weight (in=12, out=20)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(20, 6)

    def forward(self, idx, img):
        h = self.emb(idx) + self.pos(torch.arange(idx.shape[1]))
        h = torch.tanh(self.c_attn(h)).mean(1)
        return self.fc(h) + self.conv(img).mean((1, 2, 3))[:, None]


class MLP(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.fc1 = nn.Linear(16, hidden)
        self.fc2 = nn.Linear(hidden, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 50, (3, 9), generator=g), torch.randn(3, 2, 5, 5, generator=g)


def _randomise(gm, scale=0.3, seed=4):
    randomize_(gm, seed=seed, scale=scale)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            if s.module.use_dora:
                s.module.lora_magnitude.mul_(1.3)


def _peft_randomise(pm, seed=6):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in n else 0.0))


@pytest.mark.parametrize("dora", [False, True])
def test_save_adapter_loads_in_peft_with_equal_outputs(tmp_path, dora):
    model = Mixed()
    if dora:  # PEFT's DoRA norm axis matches ours for Linear and Conv only
        gm = lora_fx.transform(model, rank=3, alpha=5, use_dora=True, targets=["fc.weight", "conv.weight"])
    else:
        gm = lora_fx.transform(model, rank=3, alpha=5, use_rslora=True,
                               rank_pattern={"c_attn.weight": 2}, alpha_pattern={"fc.weight": 7.0})
    _randomise(gm)
    x = _inputs()
    out_dir = lora_fx.save_adapter(gm, tmp_path / "a")
    assert sorted(os.listdir(out_dir)) == ["adapter_config.json", "adapter_model.safetensors"]
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), out_dir)
    with torch.no_grad():
        assert_close(pm(*x), gm(*x))
        assert_not_close(pm(*x), model(*x))
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["use_dora"] is dora


@pytest.mark.parametrize("dora", [False, True])
def test_load_peft_saved_adapter_equal_outputs(tmp_path, dora):
    model = Mixed()
    targets = ["fc", "conv"] if dora else ["emb", "pos", "c_attn", "conv", "fc"]
    cfg = peft.LoraConfig(r=3, lora_alpha=6, target_modules=targets, use_dora=dora, use_rslora=not dora,
                          rank_pattern={"fc": 2}, alpha_pattern={"conv": 4}, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    _peft_randomise(pm)
    pm.save_pretrained(tmp_path / "p")
    x = _inputs()
    gm = lora_fx.load_adapter(model, tmp_path / "p")
    with torch.no_grad():
        expected = pm(*x)
        got = gm(*x)
    assert_close(got, expected)
    assert_not_close(got, model(*x))  # loading a non-zero adapter changed the output
    ranks = {s.param: s.rank for s in lora_fx.sites(gm)}
    assert ranks["fc.weight"] == 2 and ranks["conv.weight"] == 3
    # round trip: our file of the loaded adapter loads in PEFT again
    lora_fx.save_adapter(gm, tmp_path / "again")
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "again")
    with torch.no_grad():
        assert_close(pm2(*x), expected)


def test_cases2_same_base_then_wrong_base(tmp_path):
    """CASES.md 2: adapter for MLP(16→32→16), first layer only, rank 4."""
    src = MLP(32)
    gm = lora_fx.transform(src, rank=4, targets=["fc1.weight"])
    _randomise(gm)
    lora_fx.save_adapter(gm, tmp_path / "a")
    x = torch.randn(5, 16)
    # (a) same model, no config restated: identical outputs
    again = lora_fx.load_adapter(src, tmp_path / "a")
    assert_close(again(x), gm(x), ulps=0)
    # (b) MLP(16→64→16): one error listing the mismatch with both shapes; model unchanged
    other = lora_fx.transform(MLP(64), rank=2)
    n_params, out = sum(p.numel() for p in other.parameters()), other(x).detach()
    with pytest.raises(AdapterMismatchError) as err:
        lora_fx.load_adapter(other, tmp_path / "a", adapter_name="x")
    msg = str(err.value)
    assert "'fc1.lora_B.weight': file has shape (32, 4)" in msg and "expects (64, 4)" in msg
    assert sum(p.numel() for p in other.parameters()) == n_params
    assert torch.equal(other(x), out) and lora_fx.adapter_names(other) == ["default"]


def test_mismatch_lists_every_problem(tmp_path):
    model = Mixed()
    gm = lora_fx.transform(model, rank=2)
    lora_fx.save_adapter(gm, tmp_path / "a")

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 12)   # other vocabulary size
            self.pos = nn.Linear(12, 12)      # other type
            self.fc = nn.Linear(21, 6)        # other in-features

        def forward(self, x):
            return self.fc(x)

    with pytest.raises(AdapterMismatchError) as err:
        lora_fx.load_adapter(Other(), tmp_path / "a")
    msg = str(err.value)
    for needle in ("'emb.lora_embedding_A': file has shape (2, 50)",
                   "target module 'pos' (Linear): file lacks 'lora_A.weight'",
                   "'fc.lora_A.weight': file has shape (2, 20)", "target module 'c_attn' is not in Other",
                   "target module 'conv' is not in Other"):
        assert needle in msg, (needle, msg)


def test_load_into_adapted_model_as_second_adapter(tmp_path):
    model = MLP(32)
    gm = lora_fx.transform(model, rank=2)
    _randomise(gm)
    cfg = peft.LoraConfig(r=3, lora_alpha=3, target_modules=["fc2"], init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(model), cfg)
    _peft_randomise(pm)
    pm.save_pretrained(tmp_path / "p")
    x = torch.randn(4, 16)
    same = lora_fx.load_adapter(gm, tmp_path / "p", adapter_name="peft")
    assert same is gm and lora_fx.active_adapters(gm) == ["peft"]
    with torch.no_grad():
        assert_close(gm(x), pm(x))
    # loading again under the same name fills the same adapter
    lora_fx.load_adapter(gm, tmp_path / "p", adapter_name="peft")
    assert lora_fx.adapter_names(gm) == ["default", "peft"]
    with pytest.raises(AdapterMismatchError, match="already exists"):
        lora_fx.load_adapter(gm, tmp_path / "p", adapter_name="default")


def test_files_are_safetensors_only_and_written_atomically(tmp_path):
    gm = lora_fx.transform(MLP(), rank=2)
    d = lora_fx.save_adapter(gm, tmp_path / "a")
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text((d / "adapter_config.json").read_text())
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(AdapterFileError, match="never loaded"):
        lora_fx.load_adapter(MLP(), tmp_path / "bin")
    (tmp_path / "bin" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(AdapterFileError, match="not a safetensors"):
        lora_fx.load_adapter(MLP(), tmp_path / "bin")


class _Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(self.mha(x, x, x)[0])


def _peft_round_trip(model, gm, directory, x):
    """Real PEFT and lora_fx both load ``gm``'s PEFT file to ``gm``'s function of ``x``."""
    with torch.no_grad():
        want = reference_call(model, gm, (x,))
        assert_close(gm(x), want)
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), directory).eval()
        assert_close(pm(x), want)
        assert_close(lora_fx.load_adapter(copy.deepcopy(model), directory)(x), want)


def test_save_refuses_what_peft_cannot_express(tmp_path):
    gm = lora_fx.transform(_Attn(), rank=2)
    with pytest.raises(UnsupportedSiteError) as err:
        lora_fx.save_adapter(gm, tmp_path / "a")
    # out_proj.weight is read by MultiheadAttention's own forward, so PEFT's LoRA on the out_proj module
    # would have no effect (checked with real PEFT): refused; in_proj_weight is a target_parameters entry
    assert "mha.out_proj.weight" in str(err.value) and "mha.in_proj_weight" not in str(err.value)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ConfigError, match="PiSSA and DoRA"):
        lora_fx.save_adapter(lora_fx.transform(MLP(), rank=2, init="pissa", use_dora=True), tmp_path / "b")
    with pytest.raises(ConfigError, match="no adapter 'zzz'"):
        lora_fx.save_adapter(gm, tmp_path / "c", adapter="zzz")


def test_a_2d_parameter_of_a_module_peft_has_no_layer_for_is_a_target_parameters_entry(tmp_path):
    """MultiheadAttention's ``in_proj_weight`` (fused into q, k, v blocks by lora_fx) is written as one
    PEFT ``target_parameters`` pair: real PEFT loads it to lora_fx's outputs, and lora_fx loads it back."""
    torch.manual_seed(0)
    model = _Attn().eval()
    gm = lora_fx.transform(model, rank=2, targets=["mha.in_proj_weight", "fc.weight"])
    _randomise(gm, seed=4)
    lora_fx.save_adapter(gm, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mha.in_proj_weight"]
    _peft_round_trip(model, gm, tmp_path / "a", torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)))


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8) / 8 ** 0.5)

    def forward(self, x):
        return F.linear(x, self.w)


class _TwoHolders(nn.Module):
    def __init__(self):
        super().__init__()
        self.h, self.g = _Holder(), _Holder()

    def forward(self, x):
        return self.h(x) + F.linear(x, self.g.w)  # g.w is also read outside g's call


def test_a_custom_modules_parameter_saves_for_peft_unless_read_outside_its_module(tmp_path):
    torch.manual_seed(0)
    model = _TwoHolders().eval()
    gm = lora_fx.transform(model, rank=2, targets=["h.w", "g.w"])
    with pytest.raises(UnsupportedSiteError) as err:
        lora_fx.save_adapter(gm, tmp_path / "a")
    assert "'g.w' is also read outside" in str(err.value) and "exclude=['g.w']" in str(err.value)
    assert "'h.w'" not in str(err.value) and not (tmp_path / "a").exists()
    gm = lora_fx.transform(model, rank=2, targets=["h.w"])
    _randomise(gm, seed=5)
    lora_fx.save_adapter(gm, tmp_path / "b")
    _peft_round_trip(model, gm, tmp_path / "b", torch.randn(3, 8, generator=torch.Generator().manual_seed(2)))


def test_loading_values_into_compiled_module_needs_no_recompile(tmp_path):
    """CASES.md 3 (load other values): in-place loads are seen by the compiled graph, no recompile."""
    model = MLP(32)
    gm = lora_fx.transform(model, rank=2, targets=["fc1.weight"])
    src = lora_fx.transform(model, rank=2, targets=["fc1.weight"])
    _randomise(src, seed=9)
    lora_fx.save_adapter(src, tmp_path / "a")
    compiles = []

    def backend(graph_module, example_inputs):
        compiles.append(1)
        return graph_module.forward

    compiled = torch.compile(gm, backend=backend)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert_close(compiled(x), model(x))
        lora_fx.load_adapter(gm, tmp_path / "a")
        assert_close(compiled(x), src(x))
    assert len(compiles) == 1


def test_pickle_roundtrip_with_two_adapters_and_dora():
    import pickle

    model = MLP(32)
    gm = lora_fx.transform(model, rank=2)
    lora_fx.add_adapter(gm, "d", rank=3, use_dora=True, activate=True)
    _randomise(gm)
    x = torch.randn(3, 16)
    again = pickle.loads(pickle.dumps(gm))
    assert_close(again(x), gm(x), ulps=0)
    assert lora_fx.adapter_names(again) == ["default", "d"]
    lora_fx.set_active_adapters(again, "default")
    lora_fx.set_active_adapters(gm, "default")
    assert_close(again(x), gm(x), ulps=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_adapter_saved_for_the_original_base(tmp_path, rslora):
    """PiSSA trains on W_res; the file must apply to the original W: rank 2r [B, -B0] @ [A; A0]."""
    model = MLP(32)
    gm = lora_fx.transform(model, rank=3, alpha=6, init="pissa", use_rslora=rslora)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_A.add_(0.05 * torch.randn_like(s.lora_A))
            s.lora_B.add_(0.05 * torch.randn_like(s.lora_B))
    x = torch.randn(4, 16)
    assert_not_close(gm(x), model(x))
    lora_fx.save_adapter(gm, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["r"] == 6
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "p")
    with torch.no_grad():
        assert_close(pm(x), gm(x))
        assert_close(lora_fx.load_adapter(model, tmp_path / "p")(x), gm(x))


def test_peft_files_from_export_captured_model(tmp_path):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))

    model, x = M().eval(), torch.randn(3, 8)
    gm = randomize_(lora_fx.transform(model, rank=2, frontend="export", example_inputs=(x,)))
    lora_fx.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    assert_close(pm(x), gm(x))
    back = lora_fx.load_adapter(model, tmp_path, frontend="export", example_inputs=(x,))
    assert_close(back(x), gm(x))


def test_layout_mapping_is_inverse_and_matches_peft_delta_formula():
    """Property test of the explicit orientation mapping: PEFT's ΔW formula per layout (Embedding and
    Conv1D transposed) equals ours, and loading inverts saving."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from lora_fx.peft_io import _from_peft, _to_peft

    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(kind=st.sampled_from(["linear", "conv", "embedding", "conv1d_gpt2"]), r=st.integers(1, 4),
           d0=st.integers(1, 6), d1=st.integers(1, 6), k=st.integers(1, 3))
    def check(kind, r, d0, d1, k):
        shape = (d0, d1, k, k) if kind == "conv" else (d0, d1)
        fan_in = d1 * k * k if kind == "conv" else d1
        g = torch.Generator().manual_seed(1000 * r + 100 * d0 + 10 * d1 + k)
        a = torch.randn(r, fan_in, dtype=torch.float64, generator=g)
        b = torch.randn(d0, r, dtype=torch.float64, generator=g)
        ours = (b @ a).reshape(shape)
        t = _to_peft(kind, a, b, shape)
        if kind == "embedding":
            peft_delta = (t["lora_embedding_B"] @ t["lora_embedding_A"]).T
        elif kind == "conv1d_gpt2":
            peft_delta = (t["lora_B.weight"] @ t["lora_A.weight"]).T  # fan_in_fan_out transpose
        else:
            peft_delta = (t["lora_B.weight"].flatten(1) @ t["lora_A.weight"].flatten(1)).reshape(shape)
        assert_close(peft_delta, ours)
        a2, b2 = _from_peft(kind, t)
        assert torch.equal(a2, a) and torch.equal(b2, b)

    check()
