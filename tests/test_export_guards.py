"""The export front-end keeps the guards of its capture.

``torch.export`` specialises a graph on what the forward's Python looked at (a branch on a size, a
size compared for equality, sizes 0 and 1, ``dynamic_shapes=False``, non-tensor arguments).  The
adapted model checks each call against those: outside them it raises ``InputGuardError`` naming the
input and the range or value, instead of silently running the branch taken at capture; also after
``copy.deepcopy``, pickling, ``fold`` and under ``torch.compile``.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.passes import guards
from _tolerance import assert_close


class Branchy(nn.Module):
    """Takes another branch for short sequences, scales by an int argument."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, y, n: int = 2):
        h = self.lin(x)
        if x.shape[1] > 4:
            h = h * 2
        return h.sum(1) + y[:, :1] * n


def _gm(**kw):
    torch.manual_seed(0)
    model = Branchy()
    x, y = torch.randn(2, 6, 4), torch.randn(2, 3)
    gm = lora_fx.transform(model, rank=2, frontend="export", example_inputs=(x, y), example_kwargs={"n": 3}, **kw)
    return model, gm


def _raises(gm, *needles, args, kwargs):
    with pytest.raises(lora_fx.InputGuardError) as ei:
        gm(*args, **kwargs)
    assert isinstance(ei.value, lora_fx.LoraFxError)
    for needle in needles:
        assert needle in str(ei.value), str(ei.value)


def test_inputs_outside_the_capture_raise_naming_input_and_range():
    model, gm = _gm()
    with torch.no_grad():  # inside the capture's ranges: the model's numbers (B = 0)
        for b, t in [(2, 6), (5, 9), (3, 5)]:
            x, y = torch.randn(b, t, 4), torch.randn(b, 7)
            assert_close(gm(x, y, n=3), model(x, y, n=3))
    y = torch.randn(2, 3)
    _raises(gm, "'x'", "x.shape[1] = 3", "[5, inf]", args=(torch.randn(2, 3, 4), y), kwargs={"n": 3})
    _raises(gm, "'n'", "n=3", "is 4", args=(torch.randn(2, 6, 4), y), kwargs={"n": 4})
    _raises(gm, "'y'", "x.shape[0] = 2", args=(torch.randn(2, 6, 4), torch.randn(3, 3)), kwargs={"n": 3})
    _raises(gm, "x.shape[0] = 1", "0 and 1", args=(torch.randn(1, 6, 4), torch.randn(1, 3)), kwargs={"n": 3})
    _raises(gm, "'x'", "3-D", args=(torch.randn(6, 4), y), kwargs={"n": 3})


def test_static_shapes_are_checked():
    model, gm = _gm(dynamic_shapes=False)
    x, y = torch.randn(2, 6, 4), torch.randn(2, 3)
    with torch.no_grad():
        assert_close(gm(x, y, n=3), model(x, y, n=3))
    _raises(gm, "'x'", "x.shape[0] = 4", "== 2", args=(torch.randn(4, 6, 4), torch.randn(4, 3)), kwargs={"n": 3})
    _raises(gm, "x.shape[1] = 7", "== 6", args=(torch.randn(2, 7, 4), y), kwargs={"n": 3})


def test_guards_survive_copies_pickles_fold_and_compile():
    _, gm = _gm()
    bad = dict(args=(torch.randn(2, 3, 4), torch.randn(2, 3)), kwargs={"n": 3})
    good = dict(args=(torch.randn(2, 6, 4), torch.randn(2, 3)), kwargs={"n": 3})
    for m in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm)), lora_fx.fold(gm)):
        m(*good["args"], **good["kwargs"])
        _raises(m, "[5, inf]", **bad)
    compiled = torch.compile(gm, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        assert_close(compiled(*good["args"], **good["kwargs"]), gm(*good["args"], **good["kwargs"]))
        with pytest.raises(lora_fx.InputGuardError):
            compiled(*bad["args"], **bad["kwargs"])


def test_each_signature_is_checked_once():
    _, gm = _gm()
    x, y = torch.randn(3, 7, 4), torch.randn(3, 2)
    gm(x, y, n=3)
    specs = [n.args[0] for n in gm.graph.nodes if n.op == "call_function" and n.target is guards.check_input_guards]
    assert len(specs) == 1
    assert ((3, 7, 4), (3, 2), (int, 3)) in guards._SEEN[specs[0]]
