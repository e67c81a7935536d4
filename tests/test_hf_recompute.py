"""Adapter-input recomputation across a Hugging Face model's own Python (producer tags): the norm
outputs feeding q/k/v and gate/up are recomputed in backward instead of kept, gradients bit for bit
those without tags, and every condition under which a tag must not be used is honoured."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo

import lora_fx
import lora_fx.recompute as rc
from lora_fx.producers import TAG, ProducerForward, remove_producer_tags_, tag_spec

from _hf import inputs, targets, tiny
from _partitioner import saving_backend
from _reference import randomize_

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


@pytest.fixture
def recomputes(monkeypatch):
    """Counts the sites that recomputed a tagged input in backward."""
    calls = {"n": 0}
    orig = rc.PRODUCERS["tagged"]

    def counted(u, tag, **view):
        calls["n"] += 1
        return orig(u, tag, **view)

    monkeypatch.setitem(rc.PRODUCERS, "tagged", counted)
    return calls


def _pair(name="llama", dtype=torch.float32):
    on = randomize_(lora_fx.transform(tiny(name).to(dtype), rank=4, targets=targets(name)), scale=0.2)
    return on, remove_producer_tags_(copy.deepcopy(on))


def _grads(model, x, **backward):
    model.zero_grad(set_to_none=True)
    model(**x, labels=x["input_ids"]).loss.backward(**backward)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _saved_bytes(model, x) -> int:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**x, labels=x["input_ids"]).loss
    return sum(seen.values())


def _assert_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_outputs_recomputed_bitwise(recomputes, dtype):
    on, off = _pair(dtype=dtype)
    x = inputs("llama")
    _assert_equal(_grads(on, x), _grads(off, x))
    # layer 1's q/k/v (layer 0's norm input is the frozen embedding: no gradient, nothing to recompute)
    # and both layers' gate/up: 7 sites reading 3 norm outputs of 2×8×64
    assert recomputes["n"] == 7
    act = 2 * 8 * 64
    # fp32: the 3 norm outputs are no longer kept; bf16 (fp32 adapters): the 7 sites' fp32 copies of
    # their input are not kept, the 3 norms' bf16 inputs are (the norm's backward keeps an fp32 copy)
    saving = 3 * act * 4 if dtype == torch.float32 else 7 * act * 4 - 3 * act * 2
    assert _saved_bytes(off, x) - _saved_bytes(on, x) == saving
    assert not any(isinstance(m.__dict__.get("forward"), ProducerForward)
                   for m in lora_fx.fold(on).modules())  # fold removes the tags


def test_gpt2_conv1d_reads_a_view_of_the_norm_output(recomputes):
    """GPT-2's Conv1D computes addmm on ``x.view(-1, d)``: its down-projection finds the tag on the
    view's base and recomputes ``ln_1`` / ``ln_2`` outputs; gradients bit for bit those without."""
    on, off = _pair("gpt2")
    x = inputs("gpt2")
    grads = {}
    for key, m in (("on", on), ("off", off)):
        m.train()
        torch.manual_seed(0)                             # the same dropout masks in both
        grads[key] = _grads(m, x)
    _assert_equal(grads["on"], grads["off"])
    # layer 1's c_attn and both layers' c_fc (layer 0's ln_1 reads the frozen embeddings: no gradient)
    assert recomputes["n"] == 3
    torch.manual_seed(0)
    kept_off = _saved_bytes(off, x)
    torch.manual_seed(0)
    assert kept_off - _saved_bytes(on, x) == 3 * 2 * 8 * 64 * 4   # three fp32 norm outputs


def test_t5_layer_norm_branching_on_its_dtype_is_a_producer(recomputes):
    """T5LayerNorm branches on its weight's dtype (torch.fx traces it with the parameters as values),
    so the q/k/v and wi inputs after it are recomputed; gradients bit for bit those without tags, and
    checking the norm leaves nothing on the model."""
    on, off = _pair("t5")
    x = inputs("t5")
    labels = x["decoder_input_ids"]
    grads = {}
    for key, m in (("on", on), ("off", off)):
        m.zero_grad(set_to_none=True)
        m(**x, labels=labels).loss.backward()
        grads[key] = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
    _assert_equal(grads["on"], grads["off"])
    norms = [m for m in on.modules() if type(m).__name__ == "T5LayerNorm"]
    assert norms and all(isinstance(m.__dict__.get("forward"), ProducerForward) for m in norms)
    assert recomputes["n"] > 0
    assert not any(k.startswith("_tensor_constant") for m in on.modules() for k in m.__dict__)


def test_autocast_checkpointing_and_create_graph(recomputes):
    on, off = _pair()
    x = inputs("llama")
    eager_on, eager_off = (randomize_(lora_fx.transform(tiny("llama", attn_implementation="eager"), rank=4,
                                                        targets=targets("llama")), scale=0.2) for _ in range(2))
    remove_producer_tags_(eager_off)
    with torch.autocast("cpu", dtype=torch.bfloat16):   # the norm's autocast state is recorded with the tag
        _assert_equal(_grads(on, x), _grads(off, x))
    assert recomputes["n"] == 7
    for m in (on, off):
        m.gradient_checkpointing_enable()
        m.train()
    _assert_equal(_grads(on, x), _grads(off, x))       # recomputed layers tag again in their second forward
    for m in (on, off):
        m.gradient_checkpointing_disable()
    second = {}
    for key, m in (("on", eager_on), ("off", eager_off)):  # create_graph (SDPA has no double backward)
        loss = m(**x, labels=x["input_ids"]).loss
        params = [p for p in m.parameters() if p.requires_grad]
        gs = torch.autograd.grad(loss, params, create_graph=True)
        second[key] = torch.autograd.grad(sum((g * g).sum() for g in gs), params)
    for a, b in zip(second["on"], second["off"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_no_tag_when_it_could_change_a_gradient(recomputes):
    on, off = _pair()
    x = inputs("llama")
    norm = on.model.layers[1].input_layernorm
    u = torch.randn(2, 3, 64, requires_grad=True)
    out = norm(u)
    assert tag_spec(out) is not None
    out.add_(0)                                          # changed in place after the norm: no recompute
    assert tag_spec(out) is None
    with torch.no_grad():
        assert TAG not in norm(u).__dict__               # no_grad: no tag
    seen = []
    handles = [m.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.append(1))
               for m in (on, off)]                      # a hook that hands the output on: tag kept
    before = recomputes["n"]
    _assert_equal(_grads(on, x), _grads(off, x))
    assert recomputes["n"] - before == 7 and len(seen) == 2
    for h in handles:
        h.remove()
    handles = [m.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, i, o: o * 1.5)
               for m in (on, off)]                      # a hook that returns another tensor: no tag there
    before = recomputes["n"]
    _assert_equal(_grads(on, x), _grads(off, x))
    assert recomputes["n"] - before == 5
    for h in handles:
        h.remove()
    loss = on(**x, labels=x["input_ids"]).loss
    with torch.no_grad():
        norm.weight.mul_(2)                              # a producer parameter changed before backward
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_what_the_norm_read_at_forward_time_is_what_backward_recomputes_from():
    """A norm weight swapped in by torch.func.functional_call is recomputed with (not the module's
    weight at backward time), and a norm input changed in place after the norm ran disables the tag."""
    name = "model.layers.1.input_layernorm.weight"
    x = inputs("llama")

    def swapped(m):
        m.zero_grad(set_to_none=True)
        w = dict(m.named_parameters())[name]
        torch.func.functional_call(m, {name: w.detach() * 3.0}, kwargs=dict(**x, labels=x["input_ids"])).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    on, off = _pair()
    _assert_equal(swapped(on), swapped(off))
    on, off = _pair(dtype=torch.bfloat16)   # bf16: the norm keeps only an fp32 copy of its input
    def bump_input(mod, args, out):
        args[0].add_(1.0)  # after the norm ran (also the residual: both models see the same forward)

    for m in (on, off):
        m.model.layers[1].input_layernorm.register_forward_hook(bump_input)
    _assert_equal(_grads(on, x), _grads(off, x))


def test_compiled_layers_recompute_the_norm_outputs(recomputes):
    """Under torch.compile the norms run as checkpoint regions: the partitioner recomputes their
    outputs instead of saving them (the saving of the eager tags), gradients as without, no tag used,
    no graph break, no recompile on a hot-swap."""
    on, off = _pair()
    x = inputs("llama")
    expected = _grads(off, x)
    saved = {}
    for key, m in (("on", on), ("off", off)):
        saved[key] = []
        for layer in m.model.layers:
            layer.compile(backend=saving_backend(saved[key]), fullgraph=True)
    n = recomputes["n"]
    got = _grads(on, x)
    assert recomputes["n"] == n                          # the tags stay off: the partitioner recomputes
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    _grads(off, x)
    act = 2 * 8 * 64 * 4                                 # one fp32 norm output
    # layer 0: post_attention_layernorm (its input_layernorm reads the frozen embedding: nothing to keep)
    assert [a - b for a, b in zip(saved["off"], saved["on"])] == [pytest.approx(act, abs=128),
                                                                   pytest.approx(2 * act, abs=128)]
    lora_fx.set_scale_(on, 0.5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        _grads(on, x)
