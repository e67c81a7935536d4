"""Property test of adapter files: on random module trees (the grammar of ``tests/test_properties.py``:
embeddings, Linear, ``F.linear``, ``x @ W``, Conv1d / Conv2d with groups, MultiheadAttention, tied
and reused weights, blocks in a ``ModuleList``), with random non-zero adapters and a random
hot-swap (none, ``reserve_rank_``, ``set_scale_``), every save → load round trip is exact or
refused with the full list of what does not fit:

* lora_fx's own file → a fresh transform: bit-identical outputs and adapter state;
* a gathered state (single process) → ``load_full_lora_state_dict_``: bit-identical;
* a PEFT file: written and then loaded by real PEFT and by lora_fx to the same outputs, or refused
  with an ``UnsupportedSiteError`` naming every site PEFT cannot express (nothing written);
* a loralib / LoRA-Torch state dict: loaded back to the same outputs, or refused naming the sites;
* a corrupted state (random keys dropped, added, reshaped, retyped): one ``AdapterMismatchError``
  naming each of those keys, the model bit-identical afterwards.

Profiles (tests/conftest.py): a fifth of the profile's examples (default: 40, derandomized).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import lora_fx
from lora_fx.io import load_lora_state, save_lora_state
from test_properties import Net, models
from _reference import randomize_
from _tolerance import assert_close

peft = pytest.importorskip("peft")

SWAPS = ("none", "reserve_rank_", "set_scale_")


def _state(gm):
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}, [
        (s.param, s.rank, s.alpha, s.module.mix, s.module.enabled, float(s.module.scaling)) for s in lora_fx.sites(gm)]


def _same_state(a, b):
    (sa, ma), (sb, mb) = _state(a), _state(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ma == mb


def _lines(err) -> list[str]:
    return [line[4:] for line in str(err).splitlines() if line.startswith("  - ")]


@settings(max_examples=max(10, settings.default.max_examples // 5))
@given(spec=models(), dtype=st.sampled_from([torch.float32, torch.float64]), rank=st.integers(1, 3),
       swap=st.sampled_from(SWAPS), corrupt=st.sets(st.sampled_from(["missing", "unexpected", "shape", "dtype"]),
                                                   min_size=1),
       seed=st.integers(0, 2**16))
def test_every_round_trip_is_exact_or_refused_in_full(tmp_path_factory, spec, dtype, rank, swap, corrupt, seed):
    tmp = tmp_path_factory.mktemp("files")
    torch.manual_seed(seed)
    model = Net(**spec).to(dtype).eval()
    x = torch.randint(0, spec["vocab"], (2, 3)) if spec["vocab"] else torch.randn(2, 3, spec["d0"], dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_fx.LoraFxWarning)  # ranks above tiny layers' bounds
        gm = randomize_(lora_fx.transform(model, rank=rank, alpha=2.0), seed=seed, scale=0.5)
        fresh = lora_fx.transform(model, rank=rank + 1, alpha=1.0)
    if swap == "reserve_rank_" and not any(s.blocks for s in lora_fx.sites(gm)):
        lora_fx.reserve_rank_(gm, rank + 2)
    elif swap == "set_scale_":
        lora_fx.set_scale_(gm, 0.5)
    with torch.no_grad():
        want = gm(x)

    # lora_fx's own file: into a model of the same shapes bit for bit; into a transform of another
    # rank and alpha (the factors zero padded to its capacity) up to the summation order
    path = save_lora_state(gm, tmp / "own.safetensors")
    same = randomize_(copy.deepcopy(gm), seed=seed + 1)
    load_lora_state(same, path)
    _same_state(same, gm)
    with torch.no_grad():
        assert torch.equal(same(x), want)
    if not any(s.blocks for s in lora_fx.sites(gm)):  # fused factors have fixed shapes
        load_lora_state(fresh, path)
        assert [(s.rank, s.alpha, s.scaling) for s in lora_fx.sites(fresh)] == \
            [(s.rank, s.alpha, s.scaling) for s in lora_fx.sites(gm)]
        with torch.no_grad():
            assert_close(fresh(x), want, dtype=dtype)

    # the gathered state, single process
    full = copy.deepcopy(gm)
    randomize_(full, seed=seed + 2)
    lora_fx.distributed.load_full_lora_state_dict_(full, lora_fx.gather_lora_state_dict(gm))
    _same_state(full, gm)

    # PEFT: loads in PEFT and in lora_fx, or every site PEFT cannot express is named
    params = [p for s in lora_fx.sites(gm) for p in s.aliases]
    try:
        lora_fx.save_adapter(gm, tmp / "peft")
    except lora_fx.UnsupportedSiteError as err:
        event("PEFT file refused")
        assert not (tmp / "peft").exists()
        lines = _lines(err)
        assert lines and all(any(f"'{p}'" in line for p in params) for line in lines), lines
    else:
        event("PEFT file written")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp / "peft").eval()
            assert_close(pm(x), want, dtype=dtype)
            assert_close(lora_fx.load_adapter(model, tmp / "peft")(x), want, dtype=dtype)

    # loralib / LoRA-Torch: loads back, or the sites without a layout are named
    try:
        sd = lora_fx.loralib_state_dict(gm, style="loratorch", lora_alpha=1.0)
        back = copy.deepcopy(gm)
        randomize_(back, seed=seed + 3)
        lora_fx.load_loralib_state_dict(back, sd, lora_alpha=1.0)
    except lora_fx.AdapterMismatchError as err:
        event("loralib refused")
        assert _lines(err) and all(any(p in line for p in params) for line in _lines(err)), str(err)
    else:
        event("loralib loaded")
        with torch.no_grad():
            assert_close(back(x), want, dtype=dtype)

    # a corrupted state: every injected problem named, nothing changed
    sd = lora_fx.lora_state_dict(gm)
    keys = sorted(k for k in sd if k.endswith(("lora_A", "lora_B")))
    g = torch.Generator().manual_seed(seed)
    pick = [keys[i] for i in torch.randperm(len(keys), generator=g)[:4].tolist()]
    bad, needles = dict(sd), []
    for kind, key in zip(sorted(corrupt), pick + pick):
        if kind == "missing":
            del bad[key]
        elif kind == "unexpected":
            key = "nowhere.lora.default.weight.lora_A"
            bad[key] = torch.zeros(1, 1)
        elif kind == "shape":
            bad[key] = torch.zeros(bad[key].shape[0] + 7, 1, dtype=dtype)
        else:
            bad[key] = torch.ones(bad[key].shape, dtype=torch.int64)
        needles.append(key)
    target = copy.deepcopy(gm)
    before = _state(target)
    with pytest.raises(lora_fx.AdapterMismatchError) as err:
        lora_fx.distributed.load_full_lora_state_dict_(target, bad)
    for key in needles:
        assert f"'{key}'" in str(err.value), (key, str(err.value))
    _same_state(target, gm)
    assert _state(target)[1] == before[1]
