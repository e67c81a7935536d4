"""Every adapter format has the same signature shape and the same mismatch error; a new format is one
module using the shared helpers (the example of the "Extending" docs page)."""

from __future__ import annotations

import inspect
import io as _io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lora_fx
import lora_fx.io
from lora_fx.errors import AdapterMismatchError
from lora_fx.io._files import Entry, Rollback, atomic_write_bytes, entry_problems, mismatch_error
from lora_fx.state import unwrap
from lora_fx.io.state_dict import lora_state_dict

from _reference import randomize_


# --- the example of the "Extending" docs page: a new file format, one module ----------------------

def save_npz(model: nn.Module, path, *, bias: str = "none") -> Path:
    """The adapters of ``model`` as a NumPy ``.npz`` archive (written atomically)."""
    buf = _io.BytesIO()
    np.savez(buf, **{k: v.detach().float().cpu().numpy() for k, v in lora_state_dict(model, bias=bias).items()})
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_npz(model: nn.Module, path) -> nn.Module:
    """Load a :func:`save_npz` archive into ``model``; every mismatch in one error, nothing loaded."""
    with np.load(path, allow_pickle=False) as f:  # never unpickle
        sd = {k: torch.from_numpy(f[k]) for k in f.files}
    own = unwrap(model).state_dict(keep_vars=True)
    expected = {k: Entry(tuple(own[k].shape), own[k].dtype) for k in lora_state_dict(model)}
    problems = entry_problems(sd, expected)
    if problems:
        raise mismatch_error(f"adapter file {str(path)!r} does not fit {type(model).__name__}", problems)
    with torch.no_grad(), Rollback() as undo:
        for k, v in sd.items():
            undo.tensor(own[k]).copy_(v)
    return model

# -------------------------------------------------------------------------------------------------


def _mlp(n_hidden=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, n_hidden), nn.Tanh(), nn.Linear(n_hidden, 4))


def test_new_format_round_trip_and_mismatch(tmp_path):
    gm = randomize_(lora_fx.transform(_mlp(), rank=2))
    x = torch.randn(3, 6)
    path = save_npz(gm, tmp_path / "adapter.npz")
    fresh = lora_fx.transform(_mlp(), rank=2)
    assert torch.equal(load_npz(fresh, path)(x), gm(x))
    other = lora_fx.transform(_mlp(n_hidden=5), rank=2)
    before = {k: v.clone() for k, v in lora_state_dict(other).items()}
    with pytest.raises(AdapterMismatchError, match=r"does not fit Sequential \(2 problem\(s\); nothing was loaded\)") as e:
        load_npz(other, path)
    assert str(e.value).count("\n  - ") == 2  # both mis-shaped factors, in one error
    assert all(torch.equal(v, lora_state_dict(other)[k]) for k, v in before.items())


SAVERS = [lora_fx.io.save_lora_state, lora_fx.save_adapter, lora_fx.distributed.save_gathered_lora_state, save_npz]
LOADERS = [lora_fx.io.load_lora_state, lora_fx.load_adapter, lora_fx.load_loralib_state_dict,
           lora_fx.load_adapter_values_, lora_fx.distributed.load_full_lora_state_dict_, load_npz]


@pytest.mark.parametrize("fn", SAVERS + LOADERS, ids=lambda f: f.__name__)
def test_one_signature_shape(fn):
    """``fn(model, where, *, options)``: two positional parameters, every other one keyword-only."""
    params = list(inspect.signature(fn).parameters.values())
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert len(positional) == 2 and all(p.default is p.empty for p in positional), fn
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[2:]), fn


def test_every_loader_reports_with_the_one_mismatch_error(tmp_path):
    gm = lora_fx.transform(_mlp(), rank=2)
    bad = {"nope.lora_A": torch.zeros(2, 3)}
    for load in (lambda: lora_fx.load_adapter_values_(gm, bad),
                 lambda: lora_fx.distributed.load_full_lora_state_dict_(gm, bad)):
        with pytest.raises(AdapterMismatchError, match=r"\(\d+ problem\(s\); nothing was loaded\):\n  - "):
            load()
