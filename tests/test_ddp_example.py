"""examples/ddp_finetune.py at small size: 2 gloo ranks on 127.0.0.1, started by the example."""

import json

import pytest
import torch.distributed as dist

from _scripts import load_script

pytestmark = pytest.mark.distributed


def _load(name):
    return load_script("examples", name)


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="no gloo backend")
def test_ddp_finetune_small(tmp_path, capsys):
    mod = _load("ddp_finetune")
    # --timeout: the example kills its ranks past it (a rank waiting on a dead peer never returns);
    # below the per-test timeout, so the ranks die here rather than with the test worker
    res = mod.main(["--nproc", "2", "--width", "8", "--pretrain-epochs", "3", "--epochs", "4", "--out",
                    str(tmp_path), "--no-progress", "--timeout", "120"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == res
    assert res["world_size"] == 2 and res["steps"] > 0
    assert res["ranks_agree"]  # DDP kept the adapters identical on both ranks
    assert res["fold_max_abs_diff"] <= 1e-5  # fp32 logits: see tests/test_examples.py
    assert res["reload_max_abs_diff"] == 0.0
    assert 0 < res["trainable_fraction"] < 0.5
    assert res["lora_accuracy"] > res["base_accuracy"]
    assert (tmp_path / "digits_adapter.safetensors").exists()
