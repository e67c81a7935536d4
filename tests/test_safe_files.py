"""Safe adapter files: safetensors only, atomic replacement (an interrupted write leaves the
previous file intact), loading never unpickles, and no ``torch.load`` without ``weights_only=True``."""

from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lora_fx
import lora_fx.io as lio
from _reference import randomize_
from lora_fx.errors import AdapterFileError, AdapterMismatchError
from lora_fx.io import load_lora_state, save_lora_state

ROOT = Path(__file__).resolve().parents[1]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _adapted(seed):
    torch.manual_seed(0)
    gm = lora_fx.transform(MLP(), rank=4)
    torch.manual_seed(seed)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_B.normal_()
    return gm


class FailingFile:
    """A real writable file that raises after writing part of the data (disk full, kill, ...)."""

    def __init__(self, f, exc):
        self.f, self.exc = f, exc

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise self.exc

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.f.close()


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["ENOSPC", "SIGINT"])
def test_interrupted_write_keeps_previous_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "adapter.safetensors"
    first = _adapted(1)
    save_lora_state(first, path)
    before = path.read_bytes()

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FailingFile(real_fdopen(fd, mode), exc))
    with pytest.raises(type(exc)):
        save_lora_state(_adapted(2), path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # the half-written temp file is gone
    target = lora_fx.transform(MLP(), rank=4)
    load_lora_state(target, path)
    for k, v in lora_fx.lora_state_dict(first).items():
        assert torch.equal(target.state_dict()[k], v)


def test_failing_rename_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    save_lora_state(_adapted(1), path)
    before = path.read_bytes()

    def boom(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(PermissionError):
        save_lora_state(_adapted(2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]


def test_overwrite_and_new_folder(tmp_path):
    path = tmp_path / "nested" / "dir" / "adapter.safetensors"
    save_lora_state(_adapted(1), path)
    second = _adapted(2)
    save_lora_state(second, path, metadata={"step": 10})
    sd = load_file(str(path))
    assert sd.keys() == lora_fx.lora_state_dict(second).keys()
    assert all(torch.equal(sd[k], v) for k, v in lora_fx.lora_state_dict(second).items())
    assert os.listdir(path.parent) == ["adapter.safetensors"]


def test_loading_never_unpickles(tmp_path):
    """A pickle (what torch.save writes) at the adapter path is refused without being executed."""
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    for i, payload in enumerate([pickle.dumps(Evil()), None]):
        path = tmp_path / f"adapter{i}.safetensors"
        if payload is None:
            torch.save({"fc1.lora.default.weight.lora_A": torch.zeros(4, 16), "evil": Evil()}, path)
        else:
            path.write_bytes(payload)
        target = lora_fx.transform(MLP(), rank=4)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(AdapterFileError, match="never unpickles"):
            load_lora_state(target, path)
        assert not sentinel.exists()
        assert all(torch.equal(target.state_dict()[k], v) for k, v in before.items())
    sentinel_check = pickle.loads(pickle.dumps(Evil()))  # the payload does work when unpickled
    sentinel_check.close()
    assert sentinel.exists()


def test_adapter_file_never_overwrites_base_weights_nor_loads_nan(tmp_path):
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(3, 3))
    gm = lora_fx.transform(model, rank=2)
    good = save_lora_state(randomize_(gm), tmp_path / "good.safetensors")
    sd = dict(lora_fx.lora_state_dict(gm))
    save_file({**{k: v.clone() for k, v in sd.items()}, "0.weight": torch.zeros(3, 3)}, tmp_path / "base.safetensors")
    nan = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    save_file(nan, tmp_path / "nan.safetensors")
    fresh = lora_fx.transform(model, rank=2)
    w = fresh.get_parameter("0.weight").clone()
    for bad, msg in (("base.safetensors", "base weight"), ("nan.safetensors", "inf/nan")):
        with pytest.raises(AdapterMismatchError, match=msg):
            load_lora_state(fresh, tmp_path / bad)
    assert torch.equal(fresh.get_parameter("0.weight"), w)
    load_lora_state(fresh, good)


def _calls(tree, dotted):
    mod, _, fn = dotted.rpartition(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == fn:
            if isinstance(node.func.value, ast.Name) and node.func.value.id == mod:
                yield node


def test_source_never_loads_pickles_unsafely():
    """Every ``torch.load`` in the library and examples passes ``weights_only=True``; no
    ``pickle.load(s)`` at all."""
    files = [p for d in ("lora_fx", "passes", "examples") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 10
    bad = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        for call in _calls(tree, "torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True")
        for name in ("pickle.load", "pickle.loads", "pickle.Unpickler"):
            bad += [f"{path.relative_to(ROOT)}:{c.lineno}: {name}" for c in _calls(tree, name)]
    assert not bad, "\n".join(bad)
