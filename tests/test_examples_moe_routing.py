"""The MoE and routing examples, at small sizes (their figures are the examples' business; these
checks keep them running and their claims true)."""

import json

from _scripts import load_script


def _load(name):
    return load_script("examples", name)


def test_moe_experts_small(tmp_path, capsys):
    res = _load("moe_experts").main(["--hidden", "32", "--experts", "4", "--layers", "1", "--steps", "20",
                                     "--out", str(tmp_path), "--no-progress"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(res))
    assert res["loss_after"] < res["loss_before"]
    assert res["lowerings"] == ["factored"] and res["stacks"] == 2
    assert res["peft_target_parameters"] == ["model.layers.0.mlp.experts.down_proj",
                                             "model.layers.0.mlp.experts.gate_up_proj"]
    assert res["reload_max_abs_diff"] <= 1e-5 and res["fold_max_abs_diff"] <= 1e-4


def test_route_two_tasks_small(capsys):
    res = _load("route_two_tasks").main(["--width", "32", "--pretrain-epochs", "6", "--epochs", "6",
                                         "--no-progress"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(res))
    for task in ("plus1", "mirror"):  # each adapter learned its own task from the mixed batches
        assert res["accuracy_after"][task] > 0.5 > res["accuracy_before"][task]
    assert res["routed_vs_alone_max_abs_diff"] <= 1e-5
