"""Smoke test of benchmarks/bench_qlora.py --quick (no figures asserted: the benchmark reports them;
the test keeps the script running).  The memory section starts one process per variant and is left
to the benchmark run."""

import json

import pytest

from _scripts import load_script


def test_bench_qlora_quick_runs(tmp_path, capsys):
    for lib in ("torchao", "bitsandbytes", "peft", "transformers"):
        pytest.importorskip(lib)
    bench = load_script("benchmarks", "bench_qlora")
    out = tmp_path / "res.json"
    variants = ["lora_fx bf16", "lora_fx torchao-nf4", "peft bnb-nf4"]
    res = bench.main(["--quick", "--sections", "bytes,time,nf4", "--variants", ",".join(variants), "--cache",
                      str(tmp_path), "--json", str(out)])
    printed = capsys.readouterr().out
    assert "parameters + buffers" in printed and "train step" in printed
    assert list(res["bytes"]) == list(res["time"]) == variants
    assert res["bytes"]["lora_fx bf16"]["ratio"] == 1.0 and res["bytes"]["lora_fx torchao-nf4"]["decoder_ratio"] < 0.3
    assert res["nf4"]["bitwise_equal"] is True
    assert json.loads(out.read_text())["config"]["quick"] is True
