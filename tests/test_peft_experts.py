"""PEFT ``target_parameters`` files for per-expert adapters, both ways, against real PEFT."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import lora_fx
from lora_fx.io.peft_experts import from_peft, to_peft

from _moe import E, H, MoEBlock, gpt_oss_experts, mixtral_experts
from _reference import randomize_, reference_call
from _tolerance import assert_close

peft = pytest.importorskip("peft")


def _peft_model(block, **config):
    pm = peft.get_peft_model(copy.deepcopy(block), peft.LoraConfig(**config)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return pm


def test_layout_mapping_is_the_documented_one():
    """``A[e] = lora_A.weight[e·r:(e+1)·r]`` and ``B[e][:, k] = lora_B.weight[:, k·E + e]``."""
    a, b = torch.randn(E, 3, 7), torch.randn(E, 5, 3)
    la, lb = to_peft(a, b)
    assert torch.equal(la[2 * 3:3 * 3], a[2]) and torch.equal(lb[:, 1 * E + 2], b[2][:, 1])
    a2, b2 = from_peft(la, lb, E)
    assert torch.equal(a2, a) and torch.equal(b2, b)


@pytest.mark.parametrize("make", [mixtral_experts, gpt_oss_experts], ids=["mixtral", "gpt_oss_transposed"])
def test_ours_to_peft(make, tmp_path):
    """A lora_fx adapter on two stacks and a linear (ranks and alphas differ per tensor) is a PEFT
    file that ``PeftModel.from_pretrained`` loads to the same outputs."""
    block = MoEBlock(make()).eval()
    gm = lora_fx.transform(block, rank=3, targets=["experts.*_proj", "in_proj.weight"], leaf_modules=["experts"],
                           rank_pattern={"experts.down_proj": 5}, alpha_pattern={"experts.down_proj": 2.0})
    randomize_(gm, scale=0.3)
    x = torch.randn(2, 5, H)
    want = reference_call(block, gm, (x,))
    lora_fx.save_adapter(gm, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that parameter-keyed patterns match no *module*; it applies them
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(block), tmp_path).eval()
    with torch.no_grad():
        assert_close(pm(x), want)


def test_peft_to_ours_patterns_and_one_of_two_stacks(tmp_path):
    """A PEFT-saved file with rank / alpha patterns, a linear and both stacks, then one of the two
    stacks only (nesting depth 0): lora_fx computes what PEFT computes."""
    block = MoEBlock(mixtral_experts()).eval()
    x = torch.randn(2, 5, H)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, params in enumerate((["experts.gate_up_proj", "experts.down_proj"], ["experts.down_proj"])):
            pm = _peft_model(block, r=4, lora_alpha=8, target_modules=["in_proj"], target_parameters=params,
                             rank_pattern={"experts.down_proj": 6}, alpha_pattern={"in_proj": 3})
            pm.save_pretrained(tmp_path / str(i))
            gm = lora_fx.load_adapter(block, tmp_path / str(i), leaf_modules=["experts"])
            ranks = {s.param: (s.rank, s.alpha) for s in lora_fx.sites(gm)}
            assert ranks["experts.down_proj"] == (6, 8.0) and ranks["in_proj.weight"] == (4, 3.0)
            assert ("experts.gate_up_proj" in ranks) == (i == 0)
            with torch.no_grad():
                assert_close(gm(x), pm(x))


def test_mismatched_file_lists_every_problem(tmp_path):
    block = MoEBlock(mixtral_experts()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _peft_model(block, r=4, target_modules=[], target_parameters=["experts.gate_up_proj", "experts.down_proj"]
                    ).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 3  # the tensors say 4
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(lora_fx.AdapterMismatchError) as info:
        lora_fx.load_adapter(block, tmp_path, leaf_modules=["experts"])
    assert "'experts.gate_up_proj'" in str(info.value) and "'experts.down_proj'" in str(info.value)


def test_dropout_is_written_as_zero_with_a_warning(tmp_path):
    block = MoEBlock(mixtral_experts())
    gm = lora_fx.transform(block, rank=3, targets=["experts.down_proj"], leaf_modules=["experts"], dropout=0.1)
    with pytest.warns(lora_fx.LoraFxWarning, match="lora_dropout=0.0"):
        lora_fx.save_adapter(gm, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.0
