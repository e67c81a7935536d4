"""Toggles restore exactly the state they changed.

Adapter switch state is three independent pieces, each with one writer (``LoraAdapter``):

* the *active set* (``set_active_adapters``, ``set_adapter_weights``, ``add_adapter(activate=)``);
* the *on/off switch* ``enabled`` (``enable_adapters_``, ``disable_adapters``);
* the *mixing weight* ``mix`` (``set_scale_``, ``set_adapter_weights``; ``set_active_adapters`` sets 1).

The op sees ``W + Σ_name mix · alpha/rank · [active ∧ enabled] · ΔW_name``.  A property test drives
random sequences of toggles (and the operations that must not change switch state: rank
reservation, value loads, train/eval) against a plain-Python model of that state, and checks the
outputs against the functional reference built from the model of the state.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lora_fx
from _reference import randomize_, reference_call
from _tolerance import assert_close

NAMES = ("default", "b", "c")
X = torch.randn(3, 6, generator=torch.Generator().manual_seed(3))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))


def _adapted():
    model = _net()
    gm = lora_fx.transform(model, rank=2)
    lora_fx.add_adapter(gm, "b", rank=3, alpha=6.0, targets=["0.weight"])  # other targets, other rank
    lora_fx.add_adapter(gm, "c", rank=1, alpha=0.5)
    for i, n in enumerate(NAMES):
        randomize_(gm, seed=11 + i, adapter=n)
    return model, gm


def _by_name(gm) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in lora_fx.sites(gm):
        out.setdefault(s.adapter, []).append(s.module)
    return out


def _check(model, gm, state) -> None:
    """Every adapter's flags equal the model of the state, and the output equals the reference."""
    for name, mods in _by_name(gm).items():
        active, enabled, mix = state[name]
        for a in mods:
            assert (a.active, a.enabled, a.mix) == (active, enabled, mix), name
    assert lora_fx.active_adapters(gm) == [n for n in NAMES if state[n][0]]
    weights = {n: (mix if active and enabled else 0.0) for n, (active, enabled, mix) in state.items()}
    was = gm.training
    gm.eval()
    with torch.no_grad():
        assert_close(gm(X), reference_call(model, gm, (X,), weights=weights))
    gm.train(was)


# ------------------------------------------------------------------------------- the reported case


def test_disable_then_enable_keeps_inactive_adapters_off():
    """An adapter outside the active set stays out after switching every adapter off and on."""
    model, gm = _adapted()  # "b" and "c" were added inactive
    before = gm(X).detach()
    lora_fx.enable_adapters_(gm, False)
    assert_close(gm(X), model(X), ulps=0)
    lora_fx.enable_adapters_(gm, True)
    assert torch.equal(gm(X), before)
    assert lora_fx.active_adapters(gm) == ["default"]
    with lora_fx.disable_adapters(gm):
        assert lora_fx.active_adapters(gm) == ["default"]
    assert torch.equal(gm(X), before)


def test_each_toggle_and_its_inverse():
    model, gm = _adapted()
    lora_fx.set_adapter_weights(gm, {"default": 0.5, "b": 2.0}, same_targets=False)
    state = {"default": (True, True, 0.5), "b": (True, True, 2.0), "c": (False, True, 1.0)}
    _check(model, gm, state)
    before = gm(X).detach()
    # set_scale_ and back: only the mixing weight
    lora_fx.set_scale_(gm, 3.0, adapter="b")
    _check(model, gm, {**state, "b": (True, True, 3.0)})
    lora_fx.set_scale_(gm, 2.0, adapter="b")
    assert torch.equal(gm(X), before)
    # switch one adapter off and on: only its switch
    lora_fx.enable_adapters_(gm, False, adapter="default")
    _check(model, gm, {**state, "default": (True, False, 0.5)})
    lora_fx.enable_adapters_(gm, True, adapter="default")
    assert torch.equal(gm(X), before)
    # the context restores the switch it changed, nothing else: a rescale inside stays
    lora_fx.enable_adapters_(gm, False, adapter="c")
    with lora_fx.disable_adapters(gm, adapter=["default", "c"]):
        lora_fx.set_scale_(gm, 4.0, adapter="default")
        _check(model, gm, {"default": (True, False, 4.0), "b": (True, True, 2.0), "c": (False, False, 1.0)})
    _check(model, gm, {"default": (True, True, 4.0), "b": (True, True, 2.0), "c": (False, False, 1.0)})
    # switching the active set leaves the switch alone: an adapter switched off stays off
    lora_fx.set_active_adapters(gm, ["c", "b"])
    _check(model, gm, {"default": (False, True, 4.0), "b": (True, True, 1.0), "c": (True, False, 1.0)})


def test_state_kept_by_reserve_load_mode_and_grad_flags():
    """Rank reservation, value loads and train/eval change no switch state and no output; the
    toggles change no requires_grad flag and no mode."""
    model, gm = _adapted()
    lora_fx.set_adapter_weights(gm, {"default": 0.5, "c": -1.0})
    lora_fx.enable_adapters_(gm, False, adapter="c")
    state = {"default": (True, True, 0.5), "b": (False, True, 1.0), "c": (True, False, -1.0)}
    grads = {n: p.requires_grad for n, p in gm.named_parameters()}
    before = gm(X).detach()
    lora_fx.reserve_rank_(gm, 4, adapter="default")
    _check(model, gm, state)
    assert_close(gm(X), before)
    values = {k: v.clone() for k, v in lora_fx.lora_state_dict(gm).items() if ".lora.c." in k}
    lora_fx.load_adapter_values_(gm, values, adapter="c")
    _check(model, gm, state)
    for mode in (False, True):
        gm.train(mode)
        _check(model, gm, state)
        lora_fx.set_active_adapters(gm, ["default"])
        lora_fx.set_adapter_weights(gm, {"default": 0.5, "c": -1.0})
        with lora_fx.disable_adapters(gm):
            pass
        assert gm.training is mode and all(m.training is mode for m in gm.modules())
    assert grads == {n: p.requires_grad for n, p in gm.named_parameters()}


# ------------------------------------------------------------------------------- property test

_SEL = st.sampled_from([None, "default", "b", "c", ["b", "c"], ["default", "c"]])
_OPS = st.one_of(
    st.tuples(st.just("active"), st.lists(st.sampled_from(NAMES), unique=True, max_size=3)),
    st.tuples(st.just("weights"), st.dictionaries(st.sampled_from(NAMES),
                                                  st.sampled_from([-1.0, 0.0, 0.25, 1.0, 2.5]), max_size=3)),
    st.tuples(st.just("scale"), st.sampled_from([0.0, 0.5, 1.0, 3.0]), _SEL),
    st.tuples(st.just("enable"), st.booleans(), _SEL),
    st.tuples(st.just("disable"), _SEL),
    st.tuples(st.just("mode"), st.booleans()),
    st.tuples(st.just("reserve"), st.sampled_from(NAMES)),
    st.tuples(st.just("load"), st.sampled_from(NAMES)),
)


def _selected(sel) -> list[str]:
    return list(NAMES) if sel is None else ([sel] if isinstance(sel, str) else list(sel))


def _apply(gm, state, op, stack) -> None:
    """Run ``op`` on ``gm`` and on the model of the state ``{name: (active, enabled, mix)}``."""
    kind = op[0]
    if kind == "active":
        lora_fx.set_active_adapters(gm, op[1])
        for n in NAMES:
            a, e, m = state[n]
            state[n] = (n in op[1], e, 1.0 if n in op[1] else m)
    elif kind == "weights":
        lora_fx.set_adapter_weights(gm, op[1], same_targets=False)
        for n in NAMES:
            a, e, m = state[n]
            state[n] = (n in op[1], e, op[1].get(n, m))
    elif kind == "scale":
        lora_fx.set_scale_(gm, op[1], adapter=op[2])
        for n in _selected(op[2]):
            a, e, _ = state[n]
            state[n] = (a, e, op[1])
    elif kind == "enable":
        lora_fx.enable_adapters_(gm, op[1], adapter=op[2])
        for n in _selected(op[2]):
            a, _, m = state[n]
            state[n] = (a, op[1], m)
    elif kind == "disable":  # enter now; left at the end of the sequence, innermost first
        ctx = lora_fx.disable_adapters(gm, adapter=op[1])
        saved = {n: state[n][1] for n in _selected(op[1])}
        ctx.__enter__()
        stack.append((ctx, saved))
        for n in saved:
            a, _, m = state[n]
            state[n] = (a, False, m)
    elif kind == "mode":
        gm.train(op[1])
    elif kind == "reserve":
        cap = max(s.lora_A.shape[0] for s in lora_fx.sites(gm) if s.adapter == op[1])
        if cap < 5:
            lora_fx.reserve_rank_(gm, cap + 1, adapter=op[1])
    elif kind == "load":  # new values of the same ranks, in place
        g = torch.Generator().manual_seed(len(stack) + 7)
        sd = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in lora_fx.lora_state_dict(gm).items()
              if f".lora.{op[1]}." in k}
        lora_fx.load_adapter_values_(gm, sd, adapter=op[1])


@pytest.fixture(scope="module")
def pristine():
    return _adapted()


@settings(max_examples=max(60, settings().max_examples // 4))
@given(ops=st.lists(_OPS, min_size=1, max_size=8))
def test_random_toggle_sequences(pristine, ops):
    model, gm0 = pristine
    gm = copy.deepcopy(gm0)
    state = {"default": (True, True, 1.0), "b": (False, True, 1.0), "c": (False, True, 1.0)}
    _check(model, gm, state)
    stack: list = []
    for op in ops:
        _apply(gm, state, op, stack)
        _check(model, gm, state)
    while stack:  # leaving each context puts back exactly the switches it turned off
        ctx, saved = stack.pop()
        ctx.__exit__(None, None, None)
        for n, e in saved.items():
            a, _, m = state[n]
            state[n] = (a, e, m)
        _check(model, gm, state)


def test_adapter_files_restore_the_active_set_and_the_switch(tmp_path):
    """A file written by ``save_lora_state`` carries each adapter's active-set membership and
    on/off switch apart: the loaded model computes what the saved one did."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def make():
        gm = lora_fx.transform(model, rank=2)
        lora_fx.add_adapter(gm, "b", rank=2)
        return gm

    gm = make()
    for i, p in enumerate(lora_fx.adapter_parameters(gm, active_only=False)):
        torch.nn.init.normal_(p, generator=torch.Generator().manual_seed(i))
    lora_fx.set_active_adapters(gm, ["b"])
    lora_fx.enable_adapters_(gm, False, adapter="default")  # off, and outside the active set: two facts
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(9))
    lora_fx.io.save_lora_state(gm, tmp_path / "a.safetensors")
    loaded = lora_fx.io.load_lora_state(make(), tmp_path / "a.safetensors")
    assert lora_fx.active_adapters(loaded) == ["b"]
    with torch.no_grad():
        assert_close(loaded(x), gm(x))
    lora_fx.set_active_adapters(loaded, ["default", "b"])
    lora_fx.set_active_adapters(gm, ["default", "b"])  # 'default' joins the set, still switched off
    with torch.no_grad():
        assert_close(loaded(x), gm(x))
        lora_fx.enable_adapters_(gm, True)
        lora_fx.enable_adapters_(loaded, True)
        assert_close(loaded(x), gm(x))
        lora_fx.set_active_adapters(gm, ["b"])
        assert not torch.allclose(loaded(x), gm(x))  # 'default' contributes in one of them only
