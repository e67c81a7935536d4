"""Smoke test of benchmarks/bench_train.py --quick (no timing assertions: the figures are the
benchmark's business, the test only keeps the script running)."""

import json

from _scripts import load_script


def _load():
    return load_script("benchmarks", "bench_train")


def test_bench_quick_runs(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "res.json"
    res = bench.main(["--quick", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "GPT train step" in printed and "transform() vs bare symbolic_trace" in printed
    assert "this run resolves differences of" in printed
    for section in ("gpt_train", "gpt_memory", "llama_train", "hf-llama_train", "conv_train",
                    "gpt_infer", "transform"):
        assert section in res
    assert {"full", "peft", "loralib", "fx-auto", "fx-merge", "fx-auto+compile"} <= set(res["gpt_train"])
    assert {"full", "peft", "fx-auto", "fx-auto+compile"} <= set(res["llama_train"])
    assert res["gpt_train"]["full"]["ratio_to_full"] == 1.0 and res["gpt_train"]["peft"]["ratio_to_peft"] == 1.0
    lo, hi = res["gpt_train"]["fx-auto"]["ci95_to_peft"]
    assert lo <= res["gpt_train"]["fx-auto"]["ratio_to_peft"] <= hi
    assert "above_model_mib" in res["gpt_memory"]["fx-auto+compile"], res["gpt_memory"]
    assert {"full", "peft", "fx-auto", "fx-auto+compile"} <= set(res["hf-llama_train"])
    assert {"base", "fx-folded"} <= set(res["gpt_infer"]["batch1"])
    assert json.loads(out.read_text())["config"]["quick"] is True


def test_bench_hf_quick_runs(tmp_path, capsys):
    bench = load_script("benchmarks", "bench_hf")
    # the memory section starts a fresh process per variant (seconds of imports each): not here
    res = bench.main(["--quick", "--sections", "transform,train,generate", "--json", str(tmp_path / "hf.json")])
    printed = capsys.readouterr().out
    assert "transform() of a 4-layer Llama" in printed and "train (per step" in printed
    assert set(res["train"]) == set(bench.TRAIN_VARIANTS) and res["train"]["peft"]["ratio_to_peft"] == 1.0
    assert res["transform"]["ratio"] > 0
    assert res["generate"]["same_tokens_as_folded"]["lora_fx"]
    assert json.loads((tmp_path / "hf.json").read_text())["config"]["quick"] is True
