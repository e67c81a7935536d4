"""The state module: one spelling of every key, one guard, one unknown-name error, live sites."""

from __future__ import annotations

import os
import re

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import state
from lora_fx.errors import ConfigError, NotAdaptedError, UnknownAdapterError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_keys_are_spelled_only_in_the_state_module():
    keys = [state.STATE_ATTR, state.CONFIG_ATTR, state.OWNS_WEIGHTS_ATTR, state.FRONTEND_META, state.LEAF_ATTR,
            state.FRONTEND_ATTR, state.REGION_ATTR, state.KEPT_ATTR, state.CAPTURE_META, state.REQUANT_ERROR,
            state.FOLD_ATTR,
            *state.PISSA_BUFFERS, state.FILE_META["adapter"], state.FILE_META["config"], state.FILE_META["state"],
            state.FILE_META["checksums"], state.TRAINABLE_ATTR, state.BUFFERS_ATTR, state.QUANT_FLAG_ATTR, state.ROUTE_ATTR,
            state.ROUTE_BUFFER, state.STACKS_META]
    pattern = re.compile("|".join(rf"""["']{re.escape(k)}["']""" for k in keys))
    offenders = []
    for folder in ("lora_fx", "passes"):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                path = os.path.join(root, f)
                if f.endswith(".py") and path != os.path.join(ROOT, "lora_fx", "state.py"):
                    with open(path) as fh:
                        offenders += [f"{path}:{i}" for i, line in enumerate(fh, 1) if pattern.search(line)]
    assert offenders == []


def test_site_reads_the_adapter_after_a_rank_change():
    torch.manual_seed(0)
    gm = lora_fx.transform(MLP(), rank=4, alpha=8.0)
    lora_fx.reserve_rank_(gm, 6)
    site = next(s for s in lora_fx.sites(gm) if s.param == "fc1.weight")
    assert (site.rank, site.scaling, tuple(site.lora_A.shape)) == (4, 2.0, (6, 6))
    values = {k: v for k, v in lora_fx.lora_state_dict(gm).items()}
    values = {k: (v[:2] if k.endswith("lora_A") else v[:, :2]) for k, v in values.items()}
    lora_fx.load_adapter_values_(gm, values)
    assert site.rank == 2 and site.scaling == 4.0 and site.lora_A is site.module.lora_A
    lora_fx.set_scale_(gm, 0.5)
    assert site.scaling == 2.0 and site.shape == (8, 6) and site.blocks == ()


@pytest.mark.parametrize("call", [
    lambda gm: lora_fx.set_active_adapters(gm, "nope"),
    lambda gm: lora_fx.set_adapter_weights(gm, {"nope": 1.0}),
    lambda gm: lora_fx.delete_adapter(gm, "nope"),
    lambda gm: lora_fx.set_scale_(gm, 2.0, adapter="nope"),
    lambda gm: lora_fx.enable_adapters_(gm, adapter=["default", "nope"]),
    lambda gm: lora_fx.load_adapter_values_(gm, {}, adapter="nope"),
])
def test_one_error_for_an_unknown_adapter_name(call):
    gm = lora_fx.transform(MLP(), rank=2)
    with pytest.raises(UnknownAdapterError, match=r"'nope'.*adapters present: \['default'\]") as err:
        call(gm)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, NotAdaptedError)
    assert isinstance(err.value, ValueError) and isinstance(err.value, TypeError)


@pytest.mark.parametrize("name, call", [
    ("sites", lora_fx.sites), ("fold", lora_fx.fold), ("set_active_adapters", lambda m: lora_fx.set_active_adapters(m, [])),
    ("delete_adapter", lambda m: lora_fx.delete_adapter(m, "default")), ("set_scale_", lambda m: lora_fx.set_scale_(m, 1.0)),
    ("add_adapter", lambda m: lora_fx.add_adapter(m, "x")), ("blocks", lora_fx.distributed.blocks),
])
def test_one_guard_names_the_function(name, call):
    with pytest.raises(NotAdaptedError, match=rf"^{name}\(\) needs a module produced by lora_fx.transform; MLP carries"):
        call(MLP())


def test_add_adapter_needs_the_root():
    gm = lora_fx.transform(MLP(), rank=2)
    lora_fx.add_adapter(gm, "b", rank=2)  # the root works
    with pytest.raises(NotAdaptedError, match=r"add_adapter\(\) needs the root module returned by lora_fx.transform"):
        lora_fx.add_adapter(nn.Sequential(gm), "c", rank=2)


def test_adapter_path_test():
    assert state.is_adapter_path("fc.lora.default.weight.lora_A")
    assert state.is_adapter_path("lora.default.weight")
    assert not state.is_adapter_path("flora.default.weight") and not state.is_adapter_path("fc.lora")
    assert state.adapter_path("layers.0.fc.weight", "x") == "layers.0.fc.lora.x.weight"
    assert state.is_lora_key("attn.qkv_lora_A") and state.is_lora_key("fc.lora_B") and not state.is_lora_key("flora_w")


def test_iter_adapters_yields_each_adapter_once():
    gm = lora_fx.transform(MLP(), rank=2)
    lora_fx.add_adapter(gm, "b", rank=2, targets=["fc2.weight"])
    assert [(n, p) for n, p, _ in state.iter_adapters(gm)] == [
        ("default", "fc1.lora.default.weight"), ("default", "fc2.lora.default.weight"), ("b", "fc2.lora.b.weight")]
    assert [p for _, p, _ in state.iter_adapters(gm, ["b"])] == ["fc2.lora.b.weight"]
    assert state.adapter_names(gm) == ["default", "b"] == list(state.configs_of(gm))
