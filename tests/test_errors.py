"""Every refusal: typed error (a ``LoraFxError`` that is also the matching builtin), a message
naming the culprit and the fix, and the user's model unchanged afterwards."""

from __future__ import annotations

import copy
import math
import os
import warnings

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx.errors import (AdapterFileError, AdapterMismatchError, AlreadyAdaptedError, ConfigError,
                            LoraFxError, LoraFxWarning, NotAdaptedError, TargetError, TraceError,
                            UnsupportedSiteError)
from lora_fx.io import load_lora_state, save_lora_state

from _checks import assert_unchanged, snapshot


class MLP(nn.Module):
    def __init__(self, d_in=16, hidden=32, d_out=16):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture
def mlp():
    return MLP()


def _check(exc_info, builtin, *needles):
    err = exc_info.value
    assert isinstance(err, LoraFxError) and isinstance(err, builtin)
    msg = str(err)
    for n in needles:
        assert n in msg, f"{n!r} not in message: {msg}"
    return msg


@pytest.mark.parametrize("rank", [0, -3, 2.5, "4", True, None])
def test_bad_rank(mlp, rank):
    snap = snapshot(mlp)
    with pytest.raises(ConfigError) as ei:
        lora_fx.transform(mlp, rank=rank)
    _check(ei, ValueError, "rank", repr(rank), "positive int")
    assert_unchanged(mlp, snap)


def test_bad_rank_pattern(mlp):
    snap = snapshot(mlp)
    with pytest.raises(ConfigError) as ei:
        lora_fx.transform(mlp, rank=4, rank_pattern={"fc1.weight": 0})
    _check(ei, ValueError, "rank_pattern['fc1.weight']", "positive int")
    assert_unchanged(mlp, snap)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), "8"])
def test_bad_alpha(mlp, alpha):
    snap = snapshot(mlp)
    with pytest.raises(ConfigError) as ei:
        lora_fx.transform(mlp, rank=4, alpha=alpha)
    _check(ei, ValueError, "alpha", "positive number")
    assert_unchanged(mlp, snap)


@pytest.mark.parametrize("kw", [dict(dropout=1.0), dict(dropout=-0.1), dict(lowering="fast"), dict(init="zeros"),
                                dict(adapter_dtype="int8")])
def test_bad_options(mlp, kw):
    snap = snapshot(mlp)
    (name, value), = kw.items()
    with pytest.raises(ConfigError) as ei:
        lora_fx.transform(mlp, rank=4, **kw)
    _check(ei, ValueError, name, repr(value))
    assert_unchanged(mlp, snap)


def test_rank_larger_than_weight_warns_and_names_fix(mlp):
    """Documented choice: a rank above min(fan_out, fan_in) works (the update is simply full-rank)
    but warns, naming the parameter, its bound and how to fix it."""
    snap = snapshot(mlp)
    with pytest.warns(LoraFxWarning) as rec:
        gm = lora_fx.transform(mlp, rank=20, targets=["fc1.weight"])
    msg = str(rec[0].message)
    for needle in ("rank 20", "'fc1.weight'", "(32, 16)", "rank <= 16", "rank_pattern={'fc1.weight': 16}"):
        assert needle in msg, msg
    assert lora_fx.sites(gm)[0].rank == 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora_fx.transform(mlp, rank=16, targets=["fc1.weight"])  # at the bound: silent
    assert_unchanged(mlp, snap)


def test_bad_values_are_typed_errors():
    model = nn.Linear(3, 3)
    with pytest.raises(ConfigError, match="alpha"):
        lora_fx.transform(model, rank=2, alpha=math.inf)
    for name in ("", "a.b", 3):
        with pytest.raises(ConfigError, match="adapter name"):
            lora_fx.transform(model, rank=2, adapter_name=name)
    with pytest.raises(TargetError, match="targets is empty"):
        lora_fx.transform(model, rank=2, targets=[])


def test_unknown_keyword(mlp):
    snap = snapshot(mlp)
    with pytest.raises(ConfigError) as ei:
        lora_fx.transform(mlp, rank=4, target_modules=["fc1"])
    _check(ei, ValueError, "target_modules", "targets")
    assert_unchanged(mlp, snap)


def test_not_a_module():
    with pytest.raises(ConfigError) as ei:
        lora_fx.transform({"fc": 1}, rank=4)
    _check(ei, ValueError, "nn.Module", "dict")


@pytest.mark.parametrize("kw, needle", [
    (dict(targets=["fc3.*"]), "targets pattern 'fc3.*'"),
    (dict(targets="encoder.weight"), "targets pattern 'encoder.weight'"),
    (dict(exclude=["head.*"]), "exclude pattern 'head.*'"),
    (dict(targets=["fc1.weight"], exclude=["fc1.*"]), "exclude removed every target"),
    (dict(targets=["fc1.weight"], rank_pattern={"fc2.*": 2}), "rank_pattern key 'fc2.*'"),
])
def test_patterns_matching_nothing(mlp, kw, needle):
    snap = snapshot(mlp)
    with pytest.raises(TargetError) as ei:
        lora_fx.transform(mlp, rank=4, **kw)
    msg = _check(ei, ValueError, needle)
    assert "fc1.weight" in msg  # lists the candidates (or targeted names): the fix
    assert "rank_pattern" in kw or "fc2.weight" in msg
    assert_unchanged(mlp, snap)


def test_unsupported_target(mlp):
    snap = snapshot(mlp)
    with pytest.raises(UnsupportedSiteError) as ei:
        lora_fx.transform(mlp, rank=4, targets=["fc1.bias"])
    _check(ei, NotImplementedError, "'fc1.bias'", "1-D", "Remove it from targets")
    assert_unchanged(mlp, snap)


def test_already_adapted_is_refused(mlp):
    gm = lora_fx.transform(mlp, rank=4)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_B.normal_()
    x = torch.randn(3, 16)
    with torch.no_grad():
        y = gm(x)
    snap = snapshot(gm)
    for call in (lambda: lora_fx.transform(gm, rank=4), lambda: lora_fx.transform(gm, rank=8, adapter_name="other"),
                 lambda: lora_fx.transform(nn.Sequential(gm), rank=4)):
        with pytest.raises(AlreadyAdaptedError) as ei:
            call()
        _check(ei, ValueError, "already carries lora_fx adapters", "lora_fx.fold(model)")
    assert_unchanged(gm, snap, x, y)
    assert len(lora_fx.sites(gm)) == 2  # no second adapter was stacked


def test_fold_and_sites_of_unadapted(mlp):
    snap = snapshot(mlp)
    for fn in (lora_fx.fold, lora_fx.sites):
        with pytest.raises(NotAdaptedError) as ei:
            fn(mlp)
        _check(ei, TypeError, "MLP", "lora_fx.transform")
    folded = lora_fx.fold(lora_fx.transform(mlp, rank=4))
    with pytest.raises(NotAdaptedError) as ei:
        lora_fx.fold(folded)
    _check(ei, TypeError, "already folded")
    assert_unchanged(mlp, snap)


def test_trace_failure_names_module_and_line():
    """CASES.md 9 (the typed error and its message)."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            if x.shape[1] > 8:  # data-dependent on a traced value's shape
                return self.fc(x)
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Branchy()

        def forward(self, x):
            return self.inner(x)

    m = Outer()
    snap = snapshot(m)
    with pytest.raises(TraceError) as ei:
        lora_fx.transform(m, rank=2, frontend="fx")  # "auto" keeps Branchy as Python and adapts fc
    _check(ei, RuntimeError, "'inner'", "Branchy", "test_errors.py", "x.shape[1] > 8", "concrete_args",
           "leaf_modules")
    assert_unchanged(m, snap)


# -- adapter files ----------------------------------------------------------------------------


def _adapted(model, **kw):
    gm = lora_fx.transform(model, **kw)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_B.normal_()
    return gm


def test_file_for_another_model_lists_every_mismatch(tmp_path):
    """CASES.md 2: save for MLP(16→32→16), first layer, rank 4; load into MLP(16→64→16)."""
    src = _adapted(MLP(16, 32, 16), rank=4, targets=["fc1.weight"])
    path = save_lora_state(src, tmp_path / "a.safetensors")

    same = lora_fx.transform(MLP(16, 32, 16), rank=4, targets=["fc1.weight"])
    load_lora_state(same, path)
    x = torch.randn(5, 16)
    same.load_state_dict({k: v for k, v in src.state_dict().items() if "lora" not in k}, strict=False)
    with torch.no_grad():
        assert torch.equal(same(x), src(x))

    other = lora_fx.transform(MLP(16, 64, 16), rank=4, targets=["fc1.weight", "fc2.weight"])
    with torch.no_grad():
        for s in lora_fx.sites(other):
            s.lora_B.normal_()
        y = other(x)
    snap = snapshot(other)
    with pytest.raises(AdapterMismatchError) as ei:
        load_lora_state(other, path)
    msg = _check(ei, ValueError, "'fc1.lora.default.weight.lora_B': file has shape (32, 4), model has (64, 4)",
                 "missing key 'fc2.lora.default.weight.lora_A'", "missing key 'fc2.lora.default.weight.lora_B'",
                 "nothing was loaded", "same targets and ranks")
    assert msg.count("\n  - ") == 3  # every problem, in one error
    assert_unchanged(other, snap, x, y)


def test_file_with_unexpected_keys_and_into_plain_model(tmp_path):
    src = _adapted(MLP(), rank=4)
    path = save_lora_state(src, tmp_path / "a.safetensors")
    fewer = lora_fx.transform(MLP(), rank=4, targets=["fc2.weight"])
    snap = snapshot(fewer)
    with pytest.raises(AdapterMismatchError) as ei:
        load_lora_state(fewer, path)
    _check(ei, ValueError, "unexpected key 'fc1.lora.default.weight.lora_A'",
           "unexpected key 'fc1.lora.default.weight.lora_B'")
    assert_unchanged(fewer, snap)
    plain = MLP()
    snap = snapshot(plain)
    with pytest.raises(AdapterMismatchError):
        load_lora_state(plain, path)
    assert_unchanged(plain, snap)


def test_save_of_unadapted_model_is_refused(tmp_path, mlp):
    with pytest.raises(NotAdaptedError) as ei:
        save_lora_state(mlp, tmp_path / "a.safetensors")
    _check(ei, TypeError, "MLP", "lora_fx.transform")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("cut", ["empty", 4, 8, "header", "half", -1])
def test_truncated_or_corrupt_file(tmp_path, cut):
    gm = _adapted(MLP(), rank=4)
    path = save_lora_state(gm, tmp_path / "a.safetensors")
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    n = {"empty": 0, "header": header - 3, "half": (header + len(data)) // 2}.get(cut, cut)
    path.write_bytes(data[:n] if n >= 0 else data[:n] + b"\x00")  # -1: last byte cut, one garbage byte
    if cut == -1:
        path.write_bytes(b"{" + data[1:])  # corrupt header length
    target = lora_fx.transform(MLP(), rank=4)
    x = torch.randn(2, 16)
    with torch.no_grad():
        y = target(x)
    snap = snapshot(target)
    with pytest.raises(AdapterFileError) as ei:
        load_lora_state(target, path)
    _check(ei, OSError, str(path), "re-save", "never unpickles", "not changed")
    assert_unchanged(target, snap, x, y)


def test_missing_file(tmp_path):
    target = lora_fx.transform(MLP(), rank=4)
    with pytest.raises(AdapterFileError) as ei:
        load_lora_state(target, tmp_path / "nope.safetensors")
    _check(ei, FileNotFoundError.__mro__[1], "nope.safetensors", "does not exist")


def test_config_errors_from_config_object():
    with pytest.raises(ConfigError) as ei:
        lora_fx.LoraConfig.from_dict({"rank": 4, "lora_alpha": 8})
    _check(ei, ValueError, "lora_alpha", "known")
    with pytest.raises(ConfigError):
        lora_fx.LoraConfig(rank=4, version=99)
    # a model deep-copy failure is a typed error too, and the model is left alone
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.gen = (i for i in range(3))

        def forward(self, x):
            return self.fc(x)

    m = Holder()
    snap = snapshot(m)
    with pytest.raises(ConfigError) as ei:
        lora_fx.transform(m, rank=2)
    _check(ei, ValueError, "Holder", "deep-copyable")
    assert_unchanged(m, snap)
    assert copy.copy(m).fc is m.fc


def test_peft_keyword_names_get_lora_fx_names():
    with pytest.raises(ConfigError, match=r"r → rank; target_modules → targets") as err:
        lora_fx.transform(MLP(), r=4, target_modules=["fc1"])
    assert "Valid keywords" in str(err.value)
    gm = lora_fx.transform(MLP(), rank=2)
    with pytest.raises(ConfigError, match=r"lora_alpha → alpha"):
        lora_fx.add_adapter(gm, "other", lora_alpha=4)


def test_a_target_named_like_a_peft_module_gets_the_pattern_that_matches():
    with pytest.raises(TargetError, match=r"not module names: '\*\.fc1\.weight' matches 1 \(0\.fc1\.weight\)") as err:
        lora_fx.transform(nn.Sequential(MLP()), targets=["fc1"])
    assert "bias" not in str(err.value).split("Candidates:")[1]  # 1-D parameters are no candidates


def test_a_1d_or_unread_parameter_of_a_kept_class_model_is_refused_with_its_reason():
    from _hf import tiny

    model = tiny("llama")
    snap = snapshot(model)
    with pytest.raises(UnsupportedSiteError, match=r"'model\.norm\.weight'.*it is 1-D"):
        lora_fx.transform(model, targets=["model.norm.weight"])
    assert_unchanged(model, snap)


def test_a_peft_save_refusal_names_the_formats_that_hold_every_site(tmp_path):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Flatten(), nn.Linear(4, 2))
    gm = lora_fx.transform(model, rank=2)
    with pytest.raises(UnsupportedSiteError, match=r"'0\.weight'[\s\S]*save_lora_state[\s\S]*exclude="):
        lora_fx.save_adapter(gm, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
