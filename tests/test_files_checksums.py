"""Checksums: every safetensors file lora_fx writes (own files, PEFT files, gathered files) carries a
sha256 per tensor; one flipped byte inside a tensor's data is an ``AdapterFileError`` naming the
tensor and the file.  Files without checksums still load: with a warning when lora_fx wrote them
(an older version), silently when PEFT did (its files never have one)."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from safetensors.torch import save
from torch import nn

import lora_fx
from lora_fx.errors import AdapterFileError, LoraFxWarning
from lora_fx.io import load_lora_state, save_lora_state
from _reference import randomize_
from _zoo import TanhMLP as MLP

peft = pytest.importorskip("peft")


def _adapted(seed=1):
    torch.manual_seed(0)
    return randomize_(lora_fx.transform(MLP(), rank=2), seed=seed)


def _flip(path, key: str, at: int = 3) -> None:
    """Flip one bit of byte ``at`` inside tensor ``key``'s data region of a safetensors file."""
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8:8 + n])[key]["data_offsets"]
    assert end - begin > at
    data[8 + n + begin + at] ^= 0x04
    path.write_bytes(bytes(data))


def _loaders(tmp_path):
    """(file, tensor key in it, load) of every file kind lora_fx writes."""
    src = _adapted()
    own = save_lora_state(src, tmp_path / "own.safetensors")
    gathered = lora_fx.distributed.save_gathered_lora_state(src, tmp_path / "gathered.safetensors")
    lora_fx.save_adapter(src, tmp_path / "p")
    key = "fc2.lora.default.weight.lora_B"
    return [
        (own, key, lambda: load_lora_state(_adapted(2), own)),
        (gathered, key, lambda: load_lora_state(_adapted(2), gathered)),
        (tmp_path / "p" / "adapter_model.safetensors", "base_model.model.fc2.lora_B.weight",
         lambda: lora_fx.load_adapter(MLP(), tmp_path / "p")),
    ]


def test_a_flipped_byte_is_found_and_named(tmp_path):
    for path, key, load in _loaders(tmp_path):
        load()  # intact: loads
        _flip(path, key)
        with pytest.raises(AdapterFileError, match="corrupt") as err:
            load()
        assert key in str(err.value) and str(path) in str(err.value)
        assert "fc1" not in str(err.value)  # only the damaged tensor is named


def test_peft_loads_files_with_checksums(tmp_path):
    src, x = _adapted(), torch.randn(3, 6)
    lora_fx.save_adapter(src, tmp_path / "p")
    torch.manual_seed(0)
    pm = peft.PeftModel.from_pretrained(MLP(), tmp_path / "p")
    torch.testing.assert_close(pm(x), src(x))


def test_files_without_checksums_load(tmp_path):
    src, x = _adapted(), torch.randn(3, 6)
    sd = {k: v.contiguous() for k, v in lora_fx.lora_state_dict(src).items()}
    old = tmp_path / "old.safetensors"  # what an older lora_fx wrote: its format tag, no checksums
    old.write_bytes(save(sd, metadata={"format": "lora_fx"}))
    gm = _adapted(2)
    with pytest.warns(LoraFxWarning, match="no checksums"):
        load_lora_state(gm, old)
    assert torch.equal(gm(x), src(x))
    # PEFT's own files never carry one: no warning
    torch.manual_seed(0)
    pm = peft.get_peft_model(MLP(), peft.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LoraFxWarning)
        torch.manual_seed(0)
        lora_fx.load_adapter(MLP(), tmp_path / "peft")


def test_a_tensor_without_a_checksum_is_refused(tmp_path):
    """A file whose checksum list does not cover a tensor (one added by another tool) is corrupt."""
    path = save_lora_state(_adapted(), tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}
    sd["fc1.lora.default.weight.lora_B"] = sd["fc1.lora.default.weight.lora_B"] * 2
    path.write_bytes(save(sd, metadata=meta))
    with pytest.raises(AdapterFileError, match=r"fc1\.lora\.default\.weight\.lora_B"):
        load_lora_state(_adapted(2), path)
