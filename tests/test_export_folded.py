"""lora_fx.export_folded / export_onnx: fold a copy, export, check parity; the live model never changes."""

import copy

import pytest
import torch
from torch import nn

import lora_fx
from _reference import randomize_
from _zoo import CallCounter
from lora_fx.errors import ExportFileError, ExportParityError, NotAdaptedError, TraceError
from _tolerance import assert_close


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6 * 16, 5)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.conv(x))).flatten(1))


class Numpyish(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.detach().numpy() * 2)


class Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = inner

    def forward(self, x):
        return self.inner(self.fc(x))


def _adapted(model, **kw):
    return randomize_(lora_fx.transform(model, rank=2, **kw), seed=3, scale=0.2)


def _snapshot(gm):
    return {k: v.clone() for k, v in gm.state_dict().items()}, [m.training for m in gm.modules()]


def _unchanged(gm, snap, x, want):
    sd, modes = snap
    assert gm.state_dict().keys() == sd.keys()
    assert all(torch.equal(v, sd[k]) for k, v in gm.state_dict().items())
    assert [m.training for m in gm.modules()] == modes
    assert lora_fx.sites(gm)
    saved = [m.training for m in gm.modules()]
    gm.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), want)
    for m, t in zip(gm.modules(), saved):
        m.training = t


def test_export_folded_matches_eager_and_saves(tmp_path):
    """CASES.md 8: a successful folded export matches eager, holds no adapter parameters, and its
    code reads no ``.data``."""
    torch.manual_seed(0)
    gm = _adapted(Net()).train()
    x = torch.randn(2, 3, 4, 4)
    snap = _snapshot(gm)
    with torch.no_grad():
        want = copy.deepcopy(gm).eval()(x)
    path = tmp_path / "net.pt2"
    ep = lora_fx.export_folded(gm, (x,), path=str(path))
    assert set(ep.state_dict) == set(Net().state_dict())  # original names, no adapter parameters
    assert ".data" not in ep.graph_module.code and "lora" not in ep.graph_module.code
    loaded = torch.export.load(str(path))
    x8 = torch.randn(8, 3, 4, 4)  # dynamic batch by default
    with torch.no_grad():
        assert_close(loaded.module()(x), want)
        assert_close(loaded.module()(x8), copy.deepcopy(gm).eval()(x8))
    _unchanged(gm, snap, x, want)
    assert not list(tmp_path.glob(".lora_fx-*"))  # no temporary left behind


def test_unwritable_path_leaves_live_model_intact_case8(tmp_path):
    """CASES.md 8: an export that fails half-way (unwritable path) leaves the live model as it was."""
    torch.manual_seed(0)
    gm = _adapted(Net()).train()
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        want = copy.deepcopy(gm).eval()(x)
    snap = _snapshot(gm)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a directory")
    with pytest.raises(ExportFileError, match="file.txt"):
        lora_fx.export_folded(gm, (x,), path=str(blocker / "net.pt2"), dynamic_shapes=False)
    _unchanged(gm, snap, x, want)


def test_export_failing_half_way_and_parity_failure_keep_live_model():
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    gm = _adapted(Wrap(Numpyish()), leaf_modules=["inner"])
    with torch.no_grad():
        want = gm.eval()(x)
    snap = _snapshot(gm)
    with pytest.raises(TraceError, match="torch.export could not capture"):
        lora_fx.export_folded(gm, (x,), dynamic_shapes=False)
    _unchanged(gm, snap, x, want)

    gm = _adapted(Wrap(CallCounter()), leaf_modules=["inner"])
    with pytest.raises(ExportParityError, match="differs from the eager adapted model"):
        lora_fx.export_folded(gm, (x,), dynamic_shapes=False)
    assert lora_fx.sites(gm)


def test_export_folded_needs_an_adapted_model():
    with pytest.raises(NotAdaptedError):
        lora_fx.export_folded(nn.Linear(2, 2), (torch.randn(1, 2),))


def test_export_onnx_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    gm = _adapted(nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)))
    x = torch.randn(4, 6)
    snap = _snapshot(gm)
    with torch.no_grad():
        want = gm(x)
    lora_fx.export_onnx(gm, (x,), str(tmp_path / "m.onnx"), dynamic_shapes=False)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert_close(torch.from_numpy(got), want)
    _unchanged(gm, snap, x, want)
