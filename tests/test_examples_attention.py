import importlib.util
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name):
    path = os.path.join(HERE, "..", "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_attention_qv_small(capsys):
    mod = _load("attention_qv")
    res = mod.main(["--dim", "16", "--pretrain-epochs", "6", "--epochs", "6"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == json.loads(json.dumps(res))
    assert res["fold_max_abs_diff"] <= 1e-5
    assert res["k_rows_untouched"] and res["out_proj_trained"]
    assert 0 < res["trainable_fraction"] < 0.5
    assert res["lora_accuracy"] > res["base_accuracy"]
