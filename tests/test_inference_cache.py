"""The opt-in inference cache: under no_grad a region computes its factored sites on a cached merged
weight, bit for bit the folded model's (``torch.equal``), and every change of what the merged
weight was computed from invalidates it (each one: the outputs equal a fresh fold's again, and the
number of re-merges is what changed)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import lora_fx
from lora_fx.state import INFERENCE_ATTR

from _hf import inputs, targets, tiny
from _reference import randomize_
from _tolerance import assert_close

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _adapted(name="llama", dtype=torch.float32, **kw):
    gm = lora_fx.transform(tiny(name).to(dtype), rank=4, targets=targets(name), **kw)
    return randomize_(gm, scale=0.2).eval()


def _cache(gm):
    return gm.__dict__[INFERENCE_ATTR]


def _logits(model, x, mode=torch.no_grad):
    with mode():
        return model(**x).logits


def _merged_bytes(gm) -> int:
    """Bytes of one merged copy of every adapted weight."""
    ws = {id(w): w for w in (gm.get_parameter(s.param) for s in lora_fx.sites(gm))}
    return sum(w.numel() * w.element_size() for w in ws.values())


def _check(gm, x, *, misses: int | None = None):
    """Cached logits == a fresh fold's, bit for bit; and the number of merges this call made."""
    before = _cache(gm).misses
    got = _logits(gm, x)
    assert torch.equal(got, _logits(lora_fx.fold(gm).eval(), x))
    if misses is not None:
        assert _cache(gm).misses - before == misses
    return got


@pytest.mark.parametrize("name,dtype", [("llama", torch.float32), ("gpt2", torch.float32), ("llama", torch.bfloat16)])
def test_cached_equals_folded_and_merges_once(name, dtype):
    gm = _adapted(name, dtype)
    x = inputs(name)
    factored = _logits(gm, x)
    assert lora_fx.inference_cache_(gm) is gm and lora_fx.inference_cache_bytes(gm) == 0
    n = len(lora_fx.sites(gm))
    got = _check(gm, x, misses=n)  # one merge per adapted weight (GPT-2: addmm on Conv1D's view)
    _check(gm, x, misses=0)
    assert_close(got, factored, dtype=dtype)
    assert lora_fx.inference_cache_bytes(gm) == _merged_bytes(gm)
    assert "inference cache: on" in str(lora_fx.summary(gm, show=False))
    with torch.inference_mode():
        assert torch.equal(gm(**x).logits, got)
    assert _cache(gm).misses == n
    if name == "llama":  # the MLP's variant calls its producer plainly: no recompute point without grad
        mlp = gm.model.layers[0].mlp.__dict__["forward"]
        assert not any("recompute_point" in n for n in mlp._infer.code.__code__.co_names)


def test_every_invalidation_remerges_exactly_what_changed():
    gm = lora_fx.inference_cache_(_adapted())
    x = inputs("llama")
    n = len(lora_fx.sites(gm))
    _check(gm, x, misses=n)
    s0, s1 = lora_fx.sites(gm)[:2]
    with torch.no_grad():
        s0.lora_B.add_(0.1)                       # in place on B
        _check(gm, x, misses=1)
        s1.lora_A.mul_(1.5)                       # in place on A
        _check(gm, x, misses=1)
        s0.module.lora_A.data = s0.lora_A * 2     # .data swap of a factor (no version bump)
        _check(gm, x, misses=1)
        w = gm.get_parameter(s1.param)
        w.add_(0.01)                              # the base weight in place
        _check(gm, x, misses=1)
        w.data = w.data * 1.01                    # .data swap of the base weight
        _check(gm, x, misses=1)
    lora_fx.set_scale_(gm, 0.5)                   # scaling (mix) of every adapter
    _check(gm, x, misses=n)
    with lora_fx.disable_adapters(gm):            # enable state
        _check(gm, x, misses=n)
    _check(gm, x, misses=n)
    lora_fx.enable_adapters_(gm, False)
    _check(gm, x, misses=n)
    lora_fx.enable_adapters_(gm, True)
    _check(gm, x, misses=n)
    state = {k: v * 0.5 for k, v in lora_fx.lora_state_dict(gm).items()}
    lora_fx.load_adapter_values_(gm, state)       # hot-swap of the values
    _check(gm, x, misses=n)
    gm.load_state_dict(gm.state_dict())           # load_state_dict copies in place
    _check(gm, x, misses=n)
    lora_fx.mark_only_lora_as_trainable(gm)       # a training step between two generations
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.1)
    gm.train()
    gm(**x, labels=x["input_ids"]).loss.backward()
    opt.step()
    gm.eval()
    _check(gm, x, misses=n)


def test_a_write_through_data_is_picked_up_by_turning_the_cache_on_again():
    gm = lora_fx.inference_cache_(_adapted())
    x = inputs("llama")
    n = len(lora_fx.sites(gm))
    stale = _check(gm, x, misses=n)
    lora_fx.sites(gm)[0].lora_B.data.mul_(2)      # p.data has its own version counter: no key sees it
    assert torch.equal(_logits(gm, x), stale)
    assert lora_fx.inference_cache_(gm) is gm     # on again: merged afresh
    _check(gm, x, misses=n)
    lora_fx.sites(gm)[0].lora_B.data.mul_(2)
    with lora_fx.inference_cache(gm):             # entering the block does the same
        _check(gm, x, misses=n)
    assert lora_fx.inference_cache_bytes(gm) > 0  # on before the block: still on after it


def test_graph_rewrites_and_adapter_mixes():
    gm = lora_fx.inference_cache_(_adapted())
    x = inputs("llama")
    _check(gm, x)
    lora_fx.add_adapter(gm, "other", rank=2, targets=["*.q_proj.weight", "*.down_proj.weight"], activate=True)
    randomize_(gm, adapter="other", seed=5, scale=0.2)
    assert set(lora_fx.active_adapters(gm)) == {"default", "other"}
    _check(gm, x)                                 # two adapters on one weight: fold's order, one rounding
    lora_fx.set_adapter_weights(gm, {"default": 0.5, "other": -1.0}, same_targets=False)
    _check(gm, x)
    lora_fx.set_active_adapters(gm, "other")
    _check(gm, x)
    lora_fx.set_active_adapters(gm, ["default", "other"])
    lora_fx.delete_adapter(gm, "other")
    _check(gm, x)
    assert lora_fx.inference_cache_bytes(gm) == _merged_bytes(gm)  # nothing left of the rewritten regions' copies
    _cache(gm).clear()
    assert lora_fx.inference_cache_bytes(gm) == 0
    _check(gm, x, misses=len(lora_fx.sites(gm)))


def test_grad_mode_dropout_and_hooks_run_the_factored_code():
    gm = lora_fx.inference_cache_(_adapted(dropout=0.5))
    x = inputs("llama")
    plain = lora_fx.transform(tiny("llama"), rank=4, targets=targets("llama"), dropout=0.5)
    plain.load_state_dict(gm.state_dict())
    plain.eval()
    _check(gm, x)                                 # eval: dropout off, cached
    misses = _cache(gm).misses
    gm.train(), plain.train()
    for model in (gm, plain):                     # train mode, no_grad: adapter dropout applies
        torch.manual_seed(3)
        model.out = _logits(model, x)
    assert torch.equal(gm.out, plain.out)
    gm.eval(), plain.eval()
    loss = gm(**x, labels=x["input_ids"]).loss    # grad mode: factored, gradients reach the adapters
    loss.backward()
    assert all(s.lora_A.grad is not None for s in lora_fx.sites(gm))
    assert _cache(gm).misses == misses
    folded = lora_fx.fold(gm).eval()
    seen = []
    gate = gm.model.layers[0].mlp.gate_proj       # an nn.Linear called inside the MLP region
    handle = gate.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    misses = _cache(gm).misses
    torch.testing.assert_close(_logits(gm, x), _logits(folded, x), rtol=1e-5, atol=1e-5)
    assert len(seen) == 1 and _cache(gm).misses == misses  # the hook ran: the MLP ran its own code
    handle.remove()
    _check(gm, x, misses=0)


def test_generate_tokens_equal_folded():
    gm = _adapted()
    folded = lora_fx.fold(gm).eval()
    ids = inputs("llama", batch=1)["input_ids"]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with lora_fx.inference_cache(gm) as model:
        assert model is gm
        tokens = gm.generate(input_ids=ids, **kw)
        assert _cache(gm).misses == len(lora_fx.sites(gm))
    assert torch.equal(tokens, folded.generate(input_ids=ids, **kw))
    assert lora_fx.inference_cache_bytes(gm) is None  # freed on exit
    assert not any(INFERENCE_ATTR in m.__dict__ for m in gm.modules())


def test_off_copies_fold_and_errors():
    gm = lora_fx.inference_cache_(_adapted())
    x = inputs("llama")
    _check(gm, x)
    for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert lora_fx.inference_cache_bytes(other) == 0  # on, empty: merged again on first use
        assert torch.equal(_logits(other, x), _logits(gm, x))
        assert _cache(other) is other.model.layers[0].mlp.__dict__[INFERENCE_ATTR]
    folded = lora_fx.fold(gm)
    assert not any(INFERENCE_ATTR in m.__dict__ for m in folded.modules())
    lora_fx.inference_cache_(gm, enabled=False)
    assert lora_fx.inference_cache_bytes(gm) is None
    torch.testing.assert_close(_logits(gm, x), _logits(folded.eval(), x), rtol=1e-5, atol=1e-5)
    with pytest.raises(lora_fx.NotAdaptedError):
        lora_fx.inference_cache_(tiny("llama"))
    whole = lora_fx.transform(torch.nn.Sequential(torch.nn.Linear(4, 4)), rank=2)
    with pytest.raises(lora_fx.ConfigError, match="fold"):
        lora_fx.inference_cache_(whole)


def test_compiled_region_keeps_the_factored_form():
    gm = lora_fx.inference_cache_(_adapted())
    mlp = gm.model.layers[0].mlp
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(mlp, backend="eager", fullgraph=True)
    with torch.no_grad():
        expected = mlp(h)                          # cached
        misses = _cache(gm).misses
        torch.testing.assert_close(compiled(h), expected, rtol=1e-5, atol=1e-5)
    assert _cache(gm).misses == misses


def test_norms_run_their_class_forward_while_the_cache_is_on():
    from lora_fx.producers import ProducerForward

    def producers(m):
        return [n for n, mod in m.named_modules() if isinstance(mod.__dict__.get("forward"), ProducerForward)]

    gm = _adapted()
    tagged = producers(gm)
    assert len(tagged) == 2 * gm.config.num_hidden_layers + 1  # two norms per layer and the final one
    x = inputs("llama")

    def grads(m):
        m.zero_grad(set_to_none=True)
        m(**x, labels=x["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    before = grads(gm)
    with lora_fx.inference_cache(gm):
        assert producers(gm) == []
        _check(gm, x)
        during = grads(gm)  # training with the cache on: the norm outputs are kept, same gradients
        assert producers(copy.deepcopy(gm)) == []
    assert producers(gm) == tagged
    assert before.keys() == during.keys() and all(torch.equal(before[k], during[k]) for k in before)
    off = _adapted(recompute_inputs=False)
    assert producers(off) == []
    lora_fx.inference_cache_(off)
    lora_fx.inference_cache_(off, enabled=False)
    assert producers(off) == []  # recompute_inputs=False: none to restore
