"""transformers' adapter methods (``PeftAdapterMixin``) on a model lora_fx adapted act on lora_fx's
adapters (lora_fx/hf_adapter_api.py): ``disable_adapters`` / ``enable_adapters``, ``set_adapter``,
``active_adapters``, ``add_adapter`` with a PEFT ``LoraConfig``, ``delete_adapter``, ``load_adapter`` of
a PEFT folder, ``get_adapter_state_dict``; copies act on themselves, ``fold`` and the user's model
have none of them."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import lora_fx
from lora_fx import ConfigError

import _hf
from _reference import randomize_, reference_call
from _tolerance import assert_close

peft = pytest.importorskip("peft")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _ids():
    return torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def adapted():
    base = _hf.tiny("llama")
    lm = randomize_(lora_fx.transform(base, rank=4), scale=0.3)
    return base, lm


def test_disable_enable_and_active_adapters(adapted):
    base, lm = adapted
    ids = _ids()
    with torch.no_grad():
        want = reference_call(base, lm, (ids,)).logits
        assert_close(lm(ids).logits, want)
        lm.disable_adapters()
        assert torch.equal(lm(ids).logits, base(ids).logits)
        lm.enable_adapters()
        assert_close(lm(ids).logits, want)
    assert lm.active_adapters() == ["default"]
    assert "disable_adapters" not in base.__dict__  # the user's model is untouched


def test_add_adapter_with_a_peft_config_set_adapter_and_delete(adapted):
    base, lm = adapted
    ids = _ids()
    lm.add_adapter(peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
                   adapter_name="b")
    added = {s.param: s for s in lora_fx.sites(lm) if s.adapter == "b"}
    assert set(added) == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv"}
    assert {(s.rank, s.alpha) for s in added.values()} == {(2, 6.0)}
    assert lm.active_adapters() == ["b"]  # transformers' add_adapter ends with set_adapter
    randomize_(lm, scale=0.3, adapter="b", seed=4)
    lm.set_adapter("default")
    assert lm.active_adapters() == ["default"]
    lm.set_adapter(["b"])  # the active adapter trains, as PEFT's set_adapter makes it
    trains = {s.adapter for s in lora_fx.sites(lm) if s.lora_A.requires_grad and s.lora_B.requires_grad}
    assert trains == {"b"}
    with torch.no_grad():
        assert_close(lm(ids).logits, reference_call(base, lm, (ids,), weights={"b": 1.0}).logits)
    state = lm.get_adapter_state_dict("b")
    assert len(state) == 8 and all(".lora.b." in k for k in state)
    with pytest.raises(lora_fx.LoraFxError, match="zzz"):
        lm.delete_adapter(["b", "zzz"])  # all or nothing
    assert lora_fx.adapter_names(lm) == ["default", "b"]
    lm.delete_adapter("b")
    assert lora_fx.adapter_names(lm) == ["default"]
    lm.add_adapter(peft.LoraConfig(r=2), adapter_name="pd")  # PEFT's defaults for llama: q_proj, v_proj
    assert {s.param.split(".")[-2] for s in lora_fx.sites(lm) if s.adapter == "pd"} == {"q_proj", "v_proj"}


def test_add_adapter_all_linear_and_what_it_cannot_translate(adapted):
    _, lm = adapted
    lm.add_adapter(peft.LoraConfig(r=2, target_modules="all-linear"), adapter_name="all")
    assert len([s for s in lora_fx.sites(lm) if s.adapter == "all"]) == 14
    with pytest.raises(ConfigError, match="regular expression"):
        lm.add_adapter(peft.LoraConfig(r=2, target_modules=r".*q_proj"), adapter_name="rx")
    with pytest.raises(ConfigError, match="layers_to_transform"):
        lm.add_adapter(peft.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[0]), adapter_name="x")
    with pytest.raises(ConfigError, match="names no module"):
        lm.add_adapter(peft.LoraConfig(r=2, target_modules=["nope"]), adapter_name="y")
    assert lora_fx.adapter_names(lm) == ["default", "all"]


def test_load_adapter_reads_a_peft_folder(adapted, tmp_path):
    base, lm = adapted
    ids = _ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=3, lora_alpha=5, target_modules=["k_proj", "o_proj"], init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path)
    lm.load_adapter(str(tmp_path), adapter_name="peft")
    lm.set_adapter("peft")
    with torch.no_grad():
        assert_close(lm(ids).logits, pm(ids).logits)
    with pytest.raises(ConfigError, match="local adapter folder"):
        lm.load_adapter(str(tmp_path), adapter_name="z", token="hub-token")


def test_copies_act_on_themselves_and_fold_drops_the_methods(adapted):
    base, lm = adapted
    ids = _ids()
    twin = copy.deepcopy(lm)
    buf = io.BytesIO()
    torch.save(lm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (twin, loaded):
        other.disable_adapters()
        with torch.no_grad():
            assert torch.equal(other(ids).logits, base(ids).logits)
            assert not torch.equal(lm(ids).logits, base(ids).logits)  # the original stays on
    folded = lora_fx.fold(lm)
    assert not any(isinstance(v, lora_fx.adapter_methods.AdapterMethod) for v in folded.__dict__.values())


def test_graph_modules_and_plain_models_get_no_methods():
    gm = lora_fx.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), rank=2)
    assert "disable_adapters" not in gm.__dict__
