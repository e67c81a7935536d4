"""``generate()`` with the KV cache on adapted causal LMs: greedy and sampling (fixed seed), batch 2
with left padding, the same tokens as the folded model and as real PEFT holding the same adapter
values; ``labels=``, ``attention_mask=`` and the cache as keywords."""

from __future__ import annotations

import pytest
import torch

import lora_fx

from _hf import CAUSAL, PEFT_TARGETS, inputs, targets, tiny
from _reference import randomize_, reference_call
from _tolerance import assert_close

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _peft_with_our_values(name: str, gm) -> torch.nn.Module:
    """Real PEFT on a fresh copy of the base, its lora_A / lora_B set from our factors (GPT-2's
    Conv1D stores W as (in, out): PEFT's factors are then ours transposed and swapped)."""
    pm = peft.get_peft_model(tiny(name), peft.LoraConfig(r=4, lora_alpha=4, target_modules=PEFT_TARGETS[name],
                                                         init_lora_weights=False))
    ours = {s.param: s for s in lora_fx.sites(gm)}
    copied = 0
    with torch.no_grad():
        for path, layer in pm.named_modules():
            if isinstance(layer, peft.tuners.lora.LoraLayer):
                s = ours[path.removeprefix("base_model.model.") + ".weight"]
                a, b = s.lora_A, s.lora_B
                if type(layer.base_layer).__name__ == "Conv1D":
                    a, b = b.t(), a.t()
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
                copied += 1
    assert copied == len(ours)
    return pm.eval()


@pytest.mark.parametrize("name", CAUSAL)
def test_generate_matches_folded_and_peft(name):
    gm = randomize_(lora_fx.transform(tiny(name), rank=4, targets=targets(name)), scale=0.3)
    folded, pm = lora_fx.fold(gm), _peft_with_our_values(name, gm)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])  # left padding
    runs = []
    for model in (gm, folded, pm):
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        torch.manual_seed(7)
        sampled = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20,
                                 pad_token_id=0)
        runs.append((greedy, sampled))
    (greedy, sampled), *others = runs
    assert greedy.shape == (2, 12)
    for g, s in others:
        assert torch.equal(g, greedy) and torch.equal(s, sampled)
    assert not torch.equal(greedy, tiny(name).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                       do_sample=False, pad_token_id=0))  # the adapters matter


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_labels_attention_mask_and_cache_as_keywords(name):
    model = tiny(name)
    gm = randomize_(lora_fx.transform(model, rank=4, targets=targets(name)), scale=0.3)
    ids = inputs(name)["input_ids"]
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = gm(input_ids=ids, attention_mask=mask, labels=ids)
    ref = reference_call(model, gm, (), dict(input_ids=ids, attention_mask=mask, labels=ids))
    assert_close(out.loss, ref.loss)
    assert_close(out.logits, ref.logits)
    first = gm(input_ids=ids[:, :5], use_cache=True)
    assert type(first.past_key_values).__name__ == "DynamicCache"
    rest = gm(input_ids=ids[:, 5:], past_key_values=first.past_key_values, use_cache=True)
    assert_close(rest.logits, gm(input_ids=ids).logits[:, 5:])
