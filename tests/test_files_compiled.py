"""Keys are the same compiled or not: every saver and state-dict function gives the plain module's
keys for a ``torch.compile`` d (real Dynamo, eager backend) or DDP-wrapped model (a real gloo
process group in a child process), and every loader accepts such a model, and keys carrying
``_orig_mod.`` / ``module.`` parts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_fx
from lora_fx.io import load_lora_state, save_lora_state
from lora_fx.io._files import safetensors_bytes
from _isolated import run_isolated
from _reference import randomize_
from _zoo import TanhMLP as MLP

peft = pytest.importorskip("peft")


def _pair(seed=1):
    torch.manual_seed(0)
    base = MLP()
    return base, randomize_(lora_fx.transform(base, rank=2, alpha=3.0), seed=seed)


def _savers(model, tmp, tag):
    """Everything each saver writes for ``model``, with the keys it uses."""
    own = save_lora_state(model, tmp / f"{tag}.safetensors")
    lora_fx.save_adapter(model, tmp / f"{tag}_peft")
    gathered = lora_fx.distributed.save_gathered_lora_state(model, tmp / f"{tag}_gathered.safetensors")
    return {
        "lora_state_dict": lora_fx.lora_state_dict(model),
        "gather_lora_state_dict": lora_fx.gather_lora_state_dict(model),
        "loralib_state_dict": lora_fx.loralib_state_dict(model),
        "sites": {s.param: s.lora_A for s in lora_fx.sites(model)},
        "save_lora_state": load_file(str(own)),
        "save_gathered_lora_state": load_file(str(gathered)),
        "save_adapter": load_file(str(tmp / f"{tag}_peft" / "adapter_model.safetensors")),
        "peft_config": json.loads((tmp / f"{tag}_peft" / "adapter_config.json").read_text())["target_modules"],
    }


def _same(got, want):
    assert got.keys() == want.keys()
    for name in want:
        if isinstance(want[name], dict):
            assert list(got[name]) == list(want[name]), name
            assert all(torch.equal(got[name][k], want[name][k]) for k in want[name]), name
        else:
            assert got[name] == want[name], name


def test_savers_write_plain_keys_for_a_compiled_model(tmp_path):
    base, gm = _pair()
    compiled = torch.compile(gm, backend="eager")
    x = torch.randn(3, 6)
    compiled(x)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())  # what torch.compile's wrapper reports
    got, want = _savers(compiled, tmp_path, "compiled"), _savers(gm, tmp_path, "plain")
    _same(got, want)
    assert not any("_orig_mod" in k for d in got.values() if isinstance(d, dict) for k in d)
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "compiled_peft")
    torch.testing.assert_close(pm(x), gm(x))


def test_loaders_accept_a_compiled_model_and_prefixed_keys(tmp_path):
    base, src = _pair(seed=1)
    x = torch.randn(3, 6)
    path = save_lora_state(src, tmp_path / "a.safetensors")
    lora_fx.save_adapter(src, tmp_path / "p")
    loads = {
        "load_lora_state": lambda m: load_lora_state(m, path),
        "load_adapter": lambda m: lora_fx.load_adapter(m, tmp_path / "p"),
        "load_loralib_state_dict": lambda m: lora_fx.load_loralib_state_dict(m, lora_fx.loralib_state_dict(src),
                                                                              lora_alpha=3.0),
        "load_adapter_values_": lambda m: lora_fx.load_adapter_values_(m, lora_fx.lora_state_dict(src)),
        "load_full_lora_state_dict_": lambda m: lora_fx.distributed.load_full_lora_state_dict_(
            m, lora_fx.lora_state_dict(src)),
    }
    for name, load in loads.items():
        _, gm = _pair(seed=2)
        compiled = torch.compile(gm, backend="eager")
        with torch.no_grad():
            compiled(x)
            assert load(compiled) is compiled, name
            torch.testing.assert_close(compiled(x), src(x), msg=name)
    # the keys torch.compile's wrapper reports, with `_orig_mod.`: every state-dict loader reads them
    prefixed = {k: v for k, v in torch.compile(src, backend="eager").state_dict().items() if "lora_" in k}
    assert all(k.startswith("_orig_mod.") for k in prefixed)
    for load in (lora_fx.load_adapter_values_, lora_fx.distributed.load_full_lora_state_dict_):
        _, gm = _pair(seed=2)
        load(gm, prefixed)
        assert torch.equal(gm(x), src(x))
    old = tmp_path / "prefixed.safetensors"  # a file of such keys
    old.write_bytes(safetensors_bytes(prefixed))
    _, gm = _pair(seed=2)
    load_lora_state(gm, old)
    assert torch.equal(gm(x), src(x))


def _ddp_scenario(tmp: str):
    """In a child process: one gloo rank, DDP around an adapted model."""
    import pathlib

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    tmp = pathlib.Path(tmp)
    _, gm = _pair(seed=1)
    ddp = DDP(gm)
    got, want = _savers(ddp, tmp, "ddp"), _savers(gm, tmp, "plain")
    _same(got, want)
    prefixed = {k: v.detach().clone() for k, v in ddp.state_dict().items() if "lora_" in k}
    assert all(k.startswith("module.") for k in prefixed)
    x = torch.randn(3, 6)
    out = []
    for load in (lora_fx.load_adapter_values_, lora_fx.distributed.load_full_lora_state_dict_):
        _, fresh = _pair(seed=2)
        target = DDP(fresh)
        load(target, prefixed)
        out.append(torch.equal(fresh(x), gm(x)))
    _, fresh = _pair(seed=2)
    load_lora_state(DDP(fresh), tmp / "ddp.safetensors")
    out.append(torch.equal(fresh(x), gm(x)))
    del ddp, target
    return out


@pytest.mark.distributed
def test_ddp_wrapped_models_save_and_load_plain_keys(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    assert run_isolated(_ddp_scenario, str(tmp_path), timeout=90) == [True, True, True]
