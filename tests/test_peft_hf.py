"""PEFT interop on the common Hugging Face cases, against real PEFT and real transformers (tiny
random configs, the export front-end with example inputs):

* GPT-2's tied ``wte`` / ``lm_head``: one lora_fx adapter for the tied weight is saved once per
  module whose call consumes it; PEFT loads it to the same logits, and so does lora_fx; the own
  round trip ``lora_state_dict`` → ``load_adapter_values_`` works with the tied aliases; a PEFT
  file giving the tied modules different updates is refused naming both;
* PEFT files with ``embed_tokens`` / ``lm_head`` adapters and PEFT's default ``base_layer.weight``
  entries load when those equal the base, else the error names the key;
* ``modules_to_save`` both ways: PEFT's sequence-classification head loads into lora_fx, and
  ``transform(..., trainable=["classifier"])`` trains the head in full (never the user's model),
  saves it as ``modules_to_save`` (PEFT loads it), in own files, and ``fold`` keeps it.
"""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch

import lora_fx
from lora_fx.io import load_lora_state, save_lora_state
from _checks import assert_unchanged, snapshot
from _tolerance import assert_close, assert_not_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::FutureWarning")]


def _logits(out):
    return out.logits if hasattr(out, "logits") else out["logits"] if isinstance(out, dict) else out[0]


def _randomise(gm, seed=3, adapter=None):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            if adapter in (None, s.adapter):
                s.lora_B.copy_(torch.randn(s.lora_B.shape, generator=g) * 0.2)
    return gm


@pytest.fixture(scope="module")
def gpt2():
    transformers.logging.set_verbosity_error()
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    gm = lora_fx.transform(model, rank=2, alpha=4.0, targets=["transformer.wte.weight", "lm_head.weight",
                                                             "*.c_attn.weight"], example_inputs=(ids,))
    return model, _randomise(gm), ids


def test_gpt2_tied_embeddings_round_trip_through_peft(tmp_path, gpt2):
    model, gm, ids = gpt2
    tied = next(s for s in lora_fx.sites(gm) if s.param == "transformer.wte.weight")
    assert tied.aliases == ("transformer.wte.weight", "lm_head.weight")
    lora_fx.save_adapter(gm, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == r"^(?:transformer\.wte|lm_head|transformer\.h\.0\.attn\.c_attn)$"
    for again in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):  # captured leaves keep their class names
        lora_fx.save_adapter(again, tmp_path / "again")
        assert (tmp_path / "again" / "adapter_config.json").read_text() == (tmp_path / "p" / "adapter_config.json").read_text()
    with torch.no_grad():
        want = _logits(gm(ids))
        assert_not_close(want, _logits(model(ids)))
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "p").eval()
        assert_close(_logits(pm(ids)), want)
        # back into lora_fx (as a second adapter of the adapted model: no new capture)
        lora_fx.load_adapter(gm, tmp_path / "p", adapter_name="back")
        assert_close(_logits(gm(ids)), want)
        lora_fx.set_active_adapters(gm, "default")


def test_gpt2_tied_aliases_own_round_trip(gpt2):
    model, gm, ids = gpt2
    sd = {k: v for k, v in lora_fx.lora_state_dict(gm).items() if ".default." in k}
    assert "lm_head.lora.default.weight.lora_A" in sd and "transformer.wte.lora.default.weight.lora_A" in sd
    lora_fx.add_adapter(gm, "copy", rank=2, targets=["transformer.wte.weight", "lm_head.weight", "*.c_attn.weight"])
    lora_fx.load_adapter_values_(gm, sd, adapter="copy", alpha=4.0)
    with torch.no_grad():
        want = _logits(gm(ids))
        lora_fx.set_active_adapters(gm, "copy")
        assert torch.equal(_logits(gm(ids)), want)
        lora_fx.set_active_adapters(gm, "default")
    lora_fx.delete_adapter(gm, "copy")


def test_gpt2_peft_file_with_different_tied_updates_is_refused(tmp_path, gpt2):
    model, gm, ids = gpt2
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["wte", "lm_head"],
                                                                   init_lora_weights=False))
    pm.save_pretrained(tmp_path / "p")
    before = snapshot(gm)
    with pytest.raises(lora_fx.AdapterMismatchError, match=r"'lm_head' and 'transformer.wte' share one weight "
                                                           r"\(tied\).*tie_word_embeddings=False"):
        lora_fx.load_adapter(gm, tmp_path / "p", adapter_name="peft")
    assert_unchanged(gm, before)


def test_llama_embedding_and_head_adapters_with_base_layer_entries(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head", "q_proj"], init_lora_weights=False)).eval()
    pm.save_pretrained(tmp_path / "p")  # PEFT's defaults: embedding layers' base weights saved too
    from safetensors.torch import load_file
    keys = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    gm = lora_fx.transform(model, rank=2, targets=["model.layers.0.self_attn.v_proj.weight"], example_inputs=(ids,))
    with torch.no_grad():
        lora_fx.load_adapter(gm, tmp_path / "p", adapter_name="peft")
        assert_close(_logits(gm(ids)), _logits(pm(ids)))
        assert_not_close(_logits(gm(ids)), _logits(model(ids)))
    other = copy.deepcopy(model)  # another base: the file's base weights differ from it
    with torch.no_grad():
        other.model.embed_tokens.weight[3] += 1.0
    with pytest.raises(lora_fx.AdapterMismatchError, match=r"'model.embed_tokens.base_layer.weight': the file carries "
                                                           r"its own base weight for 'model.embed_tokens.weight'"):
        lora_fx.load_adapter(other, tmp_path / "p", example_inputs=(ids,))


@pytest.fixture(scope="module")
def bert():
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(1))
    snap = snapshot(model)
    gm = lora_fx.transform(model, rank=2, alpha=4.0, targets=["*.query.weight", "*.value.weight"],
                           trainable=["classifier"], example_inputs=(ids,))
    assert sorted(n for n, p in gm.named_parameters() if p.requires_grad and "lora_" not in n) == \
        ["classifier.bias", "classifier.weight"]
    labels = torch.tensor([0, 1, 2, 1])
    params = lora_fx.adapter_parameters(gm)  # the optimizer's list holds the head too
    assert {id(p) for p in params} == {id(p) for p in gm.parameters() if p.requires_grad}
    opt = torch.optim.SGD(params, lr=0.5)
    gm.train()
    for _ in range(3):
        torch.nn.functional.cross_entropy(_logits(gm(ids)), labels).backward()
        opt.step()
        opt.zero_grad()
    assert_unchanged(model, snap)  # the copy's head trained, never the user's
    return model, gm.eval(), ids


def test_trainable_head_is_saved_as_modules_to_save(tmp_path, bert):
    model, gm, ids = bert
    assert not torch.equal(gm.get_parameter("classifier.weight"), model.classifier.weight)
    lora_fx.save_adapter(gm, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["classifier"]
    with torch.no_grad():
        want = _logits(gm(ids))
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "p").eval()
        assert_close(_logits(pm(ids)), want)
        assert torch.equal(pm.base_model.model.classifier.modules_to_save["default"].weight,
                           gm.get_parameter("classifier.weight"))
        # own file: the head travels with the adapter; fold keeps it
        fresh = copy.deepcopy(gm)
        with torch.no_grad():
            fresh.get_parameter("classifier.weight").zero_()
        load_lora_state(fresh, save_lora_state(gm, tmp_path / "a.safetensors"))
        assert torch.equal(_logits(fresh(ids)), want)
        folded = lora_fx.fold(gm)
        assert torch.equal(folded.get_parameter("classifier.weight"), gm.get_parameter("classifier.weight"))
        assert_close(_logits(folded(ids)), want)


def test_peft_modules_to_save_load_into_lora_fx(tmp_path, bert):
    model, gm, ids = bert
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
        task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False))
    with torch.no_grad():
        pm.base_model.model.classifier.modules_to_save["default"].weight.mul_(3.0)
    pm.eval().save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["modules_to_save"] == ["classifier", "score"]
    target = copy.deepcopy(gm)  # the adapter of that name trains the same head: its values are loaded
    with torch.no_grad():
        lora_fx.load_adapter(target, tmp_path / "p", adapter_name="default")
        assert_close(_logits(target(ids)), _logits(pm(ids)))
    # as a new adapter next to another: the head is shared by every adapter, so it is refused
    before = snapshot(target)
    with pytest.raises(lora_fx.AdapterMismatchError, match="would replace base parameters shared by every adapter"):
        lora_fx.load_adapter(target, tmp_path / "p", adapter_name="second")
    assert_unchanged(target, before)


def test_gpt2_default_targets_save_a_file_peft_loads(tmp_path, gpt2):
    """Whatever the default targets are (tied embeddings included or not), the file loads in PEFT."""
    model, gm, ids = gpt2
    lora_fx.add_adapter(gm, "defaults", rank=2, activate=True)
    lora_fx.set_active_adapters(gm, "defaults")
    _randomise(gm, seed=9, adapter="defaults")
    try:
        lora_fx.save_adapter(gm, tmp_path / "d", adapter="defaults")
        with torch.no_grad():
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "d").eval()
            assert_close(_logits(pm(ids)), _logits(gm(ids)))
    finally:
        lora_fx.delete_adapter(gm, "defaults")
        lora_fx.set_active_adapters(gm, "default")


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "whisper", "vit"])
def test_default_targets_are_peft_all_linear_plus_convolutions(name):
    """On a transformers model the default targets are the modules PEFT's ``all-linear`` adapts
    (GPT-2's position table ``wpe`` is left out, with its reason), plus the convolutions."""
    import _hf

    lm = lora_fx.transform(_hf.tiny(name), rank=2)
    ours = {s.param.rsplit(".", 1)[0]: s for s in lora_fx.sites(lm)}
    pm = peft.get_peft_model(_hf.tiny(name), peft.LoraConfig(r=2, target_modules="all-linear"))
    theirs = {n.removeprefix("base_model.model.") for n, m in pm.named_modules()
              if hasattr(m, "lora_A") and not n.endswith(("lora_A", "lora_B"))}
    assert {k for k, s in ours.items() if not s.op.startswith("conv")} == theirs
    assert len(ours) > len(theirs) or name not in ("whisper", "vit")
    if name == "gpt2":
        reasons = {e.param: e.reason for e in lora_fx.left_out(lm)}
        assert "Embedding" in reasons["transformer.wpe.weight"] and "all-linear" in reasons["transformer.wpe.weight"]


def test_a_file_from_a_smaller_model_loads_and_names_the_modules_it_does_not_cover(tmp_path):
    """PEFT would give the extra layers' q / v fresh adapters; lora_fx leaves them out and warns."""
    import _hf

    small = _hf.tiny("llama")
    big = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**_hf._DECODER, "num_hidden_layers": 3}))
    peft.get_peft_model(small, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path)
    with pytest.warns(lora_fx.LoraFxWarning, match="holds no tensors for") as record:
        lm = lora_fx.load_adapter(big, tmp_path)
    message = next(str(w.message) for w in record if "holds no tensors" in str(w.message))
    assert "model.layers.2.self_attn.q_proj" in message and "model.layers.1" not in message
    assert len(lora_fx.sites(lm)) == 4
