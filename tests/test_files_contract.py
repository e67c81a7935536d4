"""One contract for every loader: missing, unexpected, wrong-shape and wrong-dtype keys (and a mix
of them) are all listed in one ``AdapterMismatchError``, and the model is bit-identical afterwards
(values, ``requires_grad``, parameter objects, ranks, alphas, scalings, mixing weights, the active
set).  Every loader of the library, × every kind of mismatch, on the state it reads in its own key
space: lora_fx files, PEFT directories, loralib state dicts, hot-swap values, gathered state."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import lora_fx
from lora_fx.errors import AdapterMismatchError
from lora_fx.io import load_lora_state, save_lora_state
from lora_fx.io._files import Rollback, safetensors_bytes
from lora_fx.state import FILE_META
from _reference import randomize_
from _zoo import TanhMLP as MLP

peft = pytest.importorskip("peft")


def _adapted(seed: int) -> nn.Module:
    torch.manual_seed(0)
    gm = lora_fx.transform(MLP(), rank=2, alpha=3.0)
    lora_fx.add_adapter(gm, "other", rank=3)  # inactive: loaders must leave the active set alone
    return randomize_(gm, seed=seed)


def _snapshot(gm: nn.Module) -> dict:
    return {
        "sd": {k: v.detach().clone() for k, v in gm.state_dict(keep_vars=True).items()},
        "grad": {n: (id(p), p.requires_grad) for n, p in gm.named_parameters(remove_duplicate=False)},
        "adapters": [(n, p, a.rank, a.alpha, a.mix, a.enabled, a.use_rslora, float(a.scaling))
                     for n, p, a in lora_fx.adapters.named_adapters(gm)],
        "active": lora_fx.active_adapters(gm),
        "names": lora_fx.adapter_names(gm),
    }


def _assert_same(gm, snap):
    now = _snapshot(gm)
    assert now["sd"].keys() == snap["sd"].keys()
    for k, v in snap["sd"].items():
        assert torch.equal(now["sd"][k], v), k
    for key in ("grad", "adapters", "active", "names"):
        assert now[key] == snap[key], key


# --- each loader: its source (a dict in its own key space), how it is loaded, and its key names ----

def _own(src, tmp):
    path = save_lora_state(src, tmp / "own.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def _load_own(gm, sd, meta, tmp):
    path = tmp / "mutated.safetensors"
    path.write_bytes(safetensors_bytes(sd, {FILE_META["state"]: meta[FILE_META["state"]]}))
    return load_lora_state(gm, path)


def _peft(src, tmp):
    lora_fx.save_adapter(src, tmp / "peft")
    return load_file(str(tmp / "peft" / "adapter_model.safetensors")), json.loads(
        (tmp / "peft" / "adapter_config.json").read_text())


def _load_peft(gm, sd, config, tmp):
    out = tmp / "mutated_peft"
    out.mkdir(exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "adapter_model.safetensors").write_bytes(safetensors_bytes(sd, file_format="pt"))
    return lora_fx.load_adapter(gm, out, adapter_name="default")


def _ours(name, attr, loader):
    key = f"{name}.lora.default.weight.{attr}"
    return {"peft": f"base_model.model.{name}.{attr}.weight", "loralib": f"{name}.{attr}"}.get(loader, key)


def _shown(key, loader):  # how the error names a key: PEFT's without its prefix
    return key[len("base_model.model."):] if loader == "peft" else key


LOADERS = {
    "load_lora_state": ("own", _own, _load_own),
    "load_adapter": ("peft", _peft, _load_peft),
    "load_loralib_state_dict": ("loralib", lambda src, tmp: (lora_fx.loralib_state_dict(src), None),
                                lambda gm, sd, _, tmp: lora_fx.load_loralib_state_dict(gm, sd, lora_alpha=3.0)),
    "load_adapter_values_": ("values", lambda src, tmp: (lora_fx.lora_state_dict(src), None),
                             lambda gm, sd, _, tmp: lora_fx.load_adapter_values_(
                                 gm, {k: v for k, v in sd.items() if ".default." in k})),
    "load_full_lora_state_dict_": ("full", lambda src, tmp: (lora_fx.distributed.gather_lora_state_dict(src), None),
                                   lambda gm, sd, _, tmp: lora_fx.distributed.load_full_lora_state_dict_(gm, sd)),
}


def _mutate(sd: dict, loader: str, kinds: tuple[str, ...]) -> tuple[dict, list[str]]:
    """The state with mismatches of ``kinds`` injected, and the keys the error must name."""
    sd, needles = dict(sd), []
    g = torch.Generator().manual_seed(3)
    if "missing" in kinds:
        key = _ours("fc2", "lora_B", loader)
        del sd[key]
        needles.append(_shown(key, loader))
    if "unexpected" in kinds:
        a, b = _ours("nope", "lora_A", loader), _ours("nope", "lora_B", loader)
        sd[a], sd[b] = torch.zeros(2, 6), torch.zeros(8, 2)
        needles.append("nope" if loader == "peft" else a)
    if "shape" in kinds:
        key = _ours("fc1", "lora_A", loader)
        sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 1)
        needles.append(_shown(key, loader))
    if "dtype" in kinds:  # float64 values a float32 factor cannot hold
        key = _ours("fc1", "lora_B", loader)
        sd[key] = torch.randn(sd[key].shape, dtype=torch.float64, generator=g) / 3
        needles.append(_shown(key, loader))
    return sd, needles


KINDS = [("missing",), ("unexpected",), ("shape",), ("dtype",), ("missing", "unexpected", "shape", "dtype")]


@pytest.mark.parametrize("kinds", KINDS, ids=lambda k: "+".join(k))
@pytest.mark.parametrize("name", list(LOADERS))
def test_every_loader_lists_every_mismatch_and_changes_nothing(tmp_path, name, kinds):
    loader, source, load = LOADERS[name]
    sd, extra = source(_adapted(seed=1), tmp_path)
    bad, needles = _mutate(sd, loader, kinds)
    target = _adapted(seed=2)
    snap = _snapshot(target)
    with pytest.raises(AdapterMismatchError, match=r"\(\d+ problem\(s\); nothing was loaded\):\n  - ") as err:
        load(target, bad, extra, tmp_path)
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, (needle, msg)
    assert msg.count("\n  - ") >= len(needles)
    _assert_same(target, snap)


@pytest.mark.parametrize("name", list(LOADERS))
def test_every_loader_loads_the_unchanged_state(tmp_path, name):
    """The control: the same sources, unmodified, load and change the model's outputs to the source's."""
    _, source, load = LOADERS[name]
    src = _adapted(seed=1)
    sd, extra = source(src, tmp_path)
    target = _adapted(seed=2)
    x = torch.randn(4, 6)
    with torch.no_grad():
        before = target(x)
        load(target, sd, extra, tmp_path)
        assert not torch.equal(target(x), before)
        torch.testing.assert_close(target(x), src(x))


def test_rollback_restores_tensors_and_attributes_on_error():
    gm = _adapted(seed=1)
    a = lora_fx.sites(gm)[0].module
    snap = _snapshot(gm)
    with pytest.raises(RuntimeError, match="mid-write"), torch.no_grad(), Rollback() as undo:
        undo.tensor(a.lora_A).add_(1.0)
        undo.attrs(a, ("rank", "alpha", "mix"))
        a.alpha, a.mix = 9.0, 0.25
        a.refresh_scaling_()
        raise RuntimeError("mid-write")
    _assert_same(gm, snap)


def test_tied_aliases_must_agree():
    """A tied weight's adapter is one tensor under two keys: a state giving the keys different values
    is a mismatch, not "last one wins"."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, i):
            return self.head(self.emb(i))

    i = torch.randint(0, 7, (2, 3))
    kw = dict(rank=2, targets=["emb.weight", "head.weight"], frontend="export", example_inputs=(i,))
    base = Tied()
    gm = randomize_(lora_fx.transform(base, **kw))  # export: each leaf holds the one adapter, under its path
    sd = lora_fx.lora_state_dict(gm)
    assert {"emb.lora.default.weight.lora_A", "head.lora.default.weight.lora_A"} <= set(sd)
    other = lora_fx.transform(base, **kw)
    lora_fx.load_adapter_values_(other, sd)  # both aliases, equal values: loads
    assert torch.equal(other(i), gm(i))
    bad = dict(sd)
    bad["head.lora.default.weight.lora_A"] = bad["head.lora.default.weight.lora_A"] + 1
    snap = _snapshot(other)
    with pytest.raises(AdapterMismatchError, match="one tied adapter but hold different values"):
        lora_fx.load_adapter_values_(other, bad)
    _assert_same(other, snap)


def test_values_of_several_adapters_are_not_renamed_onto_one():
    """A state holding two adapters' keys is not renamed onto the target (the second would silently
    overwrite the first): the other adapter's keys are unexpected."""
    src, gm = _adapted(seed=1), _adapted(seed=2)
    with pytest.raises(AdapterMismatchError, match="unexpected key 'fc1.lora.other.weight.lora_A'"):
        lora_fx.load_adapter_values_(gm, lora_fx.lora_state_dict(src))
    one = {k.replace(".other.", ".default."): v for k, v in lora_fx.lora_state_dict(src).items() if ".other." in k}
    renamed = {k.replace(".default.", ".b."): v for k, v in lora_fx.lora_state_dict(src).items() if ".default." in k}
    lora_fx.load_adapter_values_(gm, renamed)  # one adapter under another name: renamed
    assert lora_fx.sites(gm)[0].rank == 2 and one
