import json

from _scripts import load_script

# The examples report max |Δ| of fp32 logits (no magnitude): measured about one ulp of logits of
# magnitude ~8-16 (8e-7 .. 2e-6).  The bounds below (1e-5; 1e-4 through torch.export's other
# kernels) leave 10-50x for another BLAS or thread count while still catching any missing or
# doubled delta (which moves logits by O(0.1) and more).


def _load(name):
    return load_script("examples", name)


def test_finetune_digits_small(tmp_path, capsys):
    mod = _load("finetune_digits")
    res = mod.main(["--width", "8", "--pretrain-epochs", "3", "--epochs", "4", "--out", str(tmp_path), "--no-progress"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))
    for key in ("base_accuracy", "lora_accuracy", "trainable_fraction", "fold_max_abs_diff", "seconds"):
        assert key in res
    assert res["fold_max_abs_diff"] <= 1e-5
    assert res["reload_max_abs_diff"] == 0.0
    assert 0 < res["trainable_fraction"] < 0.5
    assert res["lora_accuracy"] > res["base_accuracy"]


def test_finetune_transformers_small(tmp_path, capsys):
    mod = _load("finetune_transformers")
    res = mod.main(["--n-embd", "16", "--layers", "1", "--heads", "2", "--vocab", "23", "--seq", "8",
                    "--batch", "8", "--steps", "25", "--out", str(tmp_path), "--no-progress"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))
    assert res["frontend"] == "export"
    assert res["loss_after"] < res["loss_before"]
    assert res["fold_max_abs_diff"] <= 1e-4 and res["export_max_abs_diff"] <= 1e-4
    assert 0 < res["trainable_fraction"] < 0.5
    assert (tmp_path / "gpt2_folded.pt2").exists() and (tmp_path / "gpt2_adapter.safetensors").exists()


def test_attention_qv_small(capsys):
    mod = _load("attention_qv")
    res = mod.main(["--dim", "16", "--pretrain-epochs", "6", "--epochs", "6"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))
    assert res["fold_max_abs_diff"] <= 1e-5
    assert res["k_rows_untouched"] and res["out_proj_trained"]
    assert 0 < res["trainable_fraction"] < 0.5
    assert res["lora_accuracy"] > res["base_accuracy"]


def test_qlora_llama_small(tmp_path, capsys):
    import pytest

    pytest.importorskip("torchao")
    mod = _load("qlora_llama")
    res = mod.main(["--layers", "1", "--steps", "30", "--batch", "8", "--out", str(tmp_path), "--no-progress"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))
    assert res["sites"] == 7 and res["loss_after"] < res["loss_before"] - 0.5
    assert res["continuation_accuracy_after"] > res["continuation_accuracy_before"]
    assert res["decoder_weight_bytes_vs_bf16"] < 0.3  # NF4 with double-quantized scales: about 0.27
    assert res["fold_max_abs_diff"] < 0.1  # bf16 logits of magnitude ~3: a few ulps
    assert len(res["generated"]) == 8 and (tmp_path / "folded" / "config.json").exists()


def test_finetune_hf_causal_lm_small(tmp_path, capsys):
    mod = _load("finetune_hf_causal_lm")
    res = mod.main(["--hidden", "32", "--layers", "1", "--seq", "24", "--batch", "8", "--steps", "12",
                    "--new-tokens", "6", "--out", str(tmp_path), "--no-progress"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))
    assert res["model_class"] == "LlamaForCausalLM" and res["frontend"] == "regions"
    assert res["loss_after"] < res["loss_before"] and res["generate_matches_folded"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "merged" / "config.json").exists()
