"""Every error class lora_fx exports, triggered from user input: the message names what the user
passed (the module, parameter, path, value or input) and a fix that works.

The table below holds one or more cases per class; a meta-test checks that every ``LoraFxError``
subclass in ``lora_fx.__all__`` has a case.  The cases the other error tests already hold in
depth (``test_errors.py``, ``test_trace_errors.py``, ``test_export_folded.py``) are represented by
one case each here; the ones added with this file: ``exclude`` removing every target, paths that
are a file where a directory is expected and vice versa, a root torch.fx cannot trace (whose fix is
not ``leaf_modules=['<root>']``), an export failure on a cache object, an attribute ``deepcopy``
refuses, a non-finite fold, ``concrete_args`` and export input guards.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.io import load_lora_state, save_lora_state

from _zoo import CallCounter


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class RootBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return x


class ReturnsObject(nn.Module):
    """Returns an object torch.export cannot flatten (as a transformers model returns its cache)."""

    class DynamicCache:
        def __init__(self, t):
            self.t = t

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x), self.DynamicCache(x)


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n = self.n + 1
        return self.fc(x) * self.n


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None):
        return self.fc(x) if mask is None else self.fc(x) * mask


class Short(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.fc(x)
        return h * 2 if x.shape[0] > 3 else h


X = torch.randn(5, 4)


def _gm():
    return lora_fx.transform(MLP(), rank=2)


def _misrouted():
    gm = _gm()
    with lora_fx.route_adapters(gm, ["default", None]):  # 2 names, a batch of 5
        gm(X)


def _file(tmp):
    path = tmp / "plain.txt"
    path.write_text("not an adapter")
    return path


def _diverged():
    gm = _gm()
    with torch.no_grad():
        lora_fx.sites(gm)[0].lora_B.fill_(float("inf"))
    return lora_fx.fold(gm)


def _parametrized():
    m = MLP()
    m.fc2 = torch.nn.utils.parametrizations.weight_norm(m.fc2)
    return lora_fx.transform(m, rank=2, targets=["fc2.weight"])


def _locked():
    m = MLP()
    m.fc1.lock = threading.Lock()
    return lora_fx.transform(m, rank=2)


class WithCounter(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inner = CallCounter()  # in an opaque leaf: export bakes in the count of its trace

    def forward(self, x):
        return self.inner(self.fc(x))


def _export_parity():
    gm = lora_fx.transform(WithCounter(), rank=2, leaf_modules=["inner"])
    return lora_fx.export_folded(gm, (X,), dynamic_shapes=False)


CASES = {
    "config: bad rank": (lora_fx.ConfigError, lambda t: lora_fx.transform(MLP(), rank=0), ("rank", "0", "positive int")),
    "config: uncopyable attribute": (lora_fx.ConfigError, lambda t: _locked(), ("'fc1'", "'lock'", "delete that attribute")),
    "config: unknown adapter name": (lora_fx.UnknownAdapterError, lambda t: lora_fx.set_active_adapters(_gm(), "x"),
                                     ("'x'", "adapters present", "add_adapter")),
    "target: exclude removed all": (lora_fx.TargetError, lambda t: lora_fx.transform(MLP(), exclude=["*"]),
                                    ("exclude removed every target", "exclude=['*']", "fc1.weight",
                                     "Narrow the exclude patterns")),
    "target: pattern matches nothing": (lora_fx.TargetError, lambda t: lora_fx.transform(MLP(), targets=["fc9.*"]),
                                        ("'fc9.*'", "Candidates", "fc1.weight")),
    "unsupported: 1-D target": (lora_fx.UnsupportedSiteError, lambda t: lora_fx.transform(MLP(), targets=["fc1.bias"]),
                                ("'fc1.bias'", "1-D", "target a weight matrix")),
    "unsupported: parametrized": (lora_fx.UnsupportedSiteError, lambda t: _parametrized(),
                                  ("'fc2.weight'", "parametrization", "remove_parametrizations")),
    "trace: root": (lora_fx.TraceError, lambda t: lora_fx.transform(RootBranch(), rank=2, frontend="fx"),
                    ("'<root>'", "RootBranch", "x.sum() > 0", "concrete_args", "frontend='regions'",
                     "frontend='export'", "submodule")),
    "trace: export of a cache object": (lora_fx.TraceError,
                                        lambda t: lora_fx.transform(ReturnsObject(), frontend="export",
                                                                    example_inputs=(X,)),
                                        ("ReturnsObject", "DynamicCache", "use_cache=False")),
    "trace: assignment": (lora_fx.TraceError, lambda t: lora_fx.transform(Counter(), rank=2, frontend="fx"),
                          ("'n'", "Counter", "in place")),
    "guard: concrete_args": (lora_fx.InputGuardError,
                             lambda t: lora_fx.transform(Masked(), rank=2, concrete_args={"mask": None})(X, X),
                             ("mask", "fixed to None", "transform again")),
    "guard: export size": (lora_fx.InputGuardError,
                           lambda t: lora_fx.transform(Short(), rank=2, frontend="export",
                                                       example_inputs=(X,))(torch.randn(3, 4)),
                           ("'x'", "x.shape[0] = 3", "[4, inf]", "transform again with example inputs")),
    "not adapted": (lora_fx.NotAdaptedError, lambda t: lora_fx.sites(MLP()), ("sites()", "MLP", "lora_fx.transform")),
    "already adapted": (lora_fx.AlreadyAdaptedError, lambda t: lora_fx.transform(_gm()), ("add_adapter", "fold")),
    "mismatch: file for another model": (
        lora_fx.AdapterMismatchError,
        lambda t: load_lora_state(lora_fx.transform(nn.Sequential(nn.Linear(4, 2)), rank=2),
                                  save_lora_state(_gm(), t / "a.safetensors")),
        ("a.safetensors", "fc1", "missing key")),
    "file: save_adapter to a file": (lora_fx.AdapterFileError, lambda t: lora_fx.save_adapter(_gm(), _file(t)),
                                     ("plain.txt", "existing file", "save_lora_state")),
    "file: save_lora_state to a directory": (lora_fx.AdapterFileError, lambda t: save_lora_state(_gm(), t),
                                             (str("{tmp}"), "existing directory", "save_adapter")),
    "file: load_lora_state of a directory": (lora_fx.AdapterFileError, lambda t: load_lora_state(_gm(), t),
                                             ("is a directory", "load_adapter")),
    "file: load_adapter of a file": (lora_fx.AdapterFileError, lambda t: lora_fx.load_adapter(MLP(), _file(t)),
                                     ("plain.txt", "is a file", "load_lora_state")),
    "file: below a file": (lora_fx.AdapterFileError,
                           lambda t: save_lora_state(_gm(), _file(t) / "a.safetensors"),
                           ("plain.txt", "is a file, not a directory")),
    "routing: names and batch differ": (lora_fx.RoutingError, lambda t: _misrouted(),
                                         ("2 adapter names", "'fc1.weight'", "5 rows", "one name per sample")),
    "non-finite fold": (lora_fx.NonFiniteError, lambda t: _diverged(), ("'fc1.weight'", "inf/NaN", "learning rate")),
    "export parity": (lora_fx.ExportParityError, lambda t: _export_parity(),
                      ("differs from the eager adapted model", "buffer")),
    "export file": (lora_fx.ExportFileError,
                    lambda t: lora_fx.export_folded(_gm(), (X,), path=str(_file(t) / "m.pt2"), dynamic_shapes=False),
                    ("m.pt2", "writable path")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_error_names_the_culprit_and_the_fix(case, tmp_path):
    cls, trigger, needles = CASES[case]
    with pytest.raises(lora_fx.LoraFxError) as ei:
        trigger(tmp_path)
    assert isinstance(ei.value, cls), (type(ei.value).__name__, str(ei.value))
    assert not isinstance(ei.value, KeyError)
    msg = str(ei.value)
    for needle in needles:
        needle = needle.replace("{tmp}", str(tmp_path))
        assert needle in msg, f"{needle!r} not in: {msg}"


def test_every_error_class_has_a_case():
    classes = {getattr(lora_fx, n) for n in lora_fx.__all__ if isinstance(getattr(lora_fx, n), type)
               and issubclass(getattr(lora_fx, n), lora_fx.LoraFxError) and getattr(lora_fx, n) is not lora_fx.LoraFxError}
    covered = {cls for cls, _, _ in CASES.values()}
    assert classes <= covered, sorted(c.__name__ for c in classes - covered)
