"""Training an adapted Hugging Face model the usual ways: ``transformers.Trainer`` (3 steps and
``save_model``), the model's own activation checkpointing (same gradients, layers really
recomputed), and ``torch.compile`` of the whole model (the same graph breaks as the plain model)
and per decoder layer (``fullgraph=True``: no break inside), with hot-swaps that do not recompile."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import lora_fx

from _hf import inputs, targets, tiny
from _reference import randomize_, reference_call
from _tolerance import assert_close

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


class _Tokens(torch.utils.data.Dataset):
    """12 sequences of 16 random token ids (labels = inputs: causal LM)."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(3, 128, (16,), generator=g) for _ in range(12)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_trainer_trains_and_saves(tmp_path):
    gm = lora_fx.transform(tiny("llama"), rank=4, targets=targets("llama")).train()
    before = {k: v.clone() for k, v in lora_fx.lora_state_dict(gm).items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=gm, args=args, train_dataset=_Tokens())
    result = trainer.train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    after = lora_fx.lora_state_dict(gm)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every factor moved (B first, then A)
    assert all(not p.requires_grad for n, p in gm.named_parameters() if ".lora." not in n)
    trainer.save_model(str(tmp_path / "model"))  # the whole model, adapters included: no shared tensors
    loaded = type(gm).from_pretrained(tmp_path / "model")  # the base class reads the base weights back
    assert torch.equal(loaded.lm_head.weight, gm.lm_head.weight)
    # the checkpoint is no adapter folder: load_adapter says so and how to load it, which works
    with pytest.raises(lora_fx.AdapterFileError, match="full model checkpoint.*load_state_dict"):
        lora_fx.load_adapter(tiny("llama"), tmp_path / "model")
    from safetensors.torch import load_file

    again = lora_fx.transform(tiny("llama"), rank=4, targets=targets("llama"))
    again.load_state_dict(load_file(tmp_path / "model" / "model.safetensors"))
    x = inputs("llama")
    with torch.no_grad():
        assert torch.equal(again(**x).logits, gm.eval()(**x).logits)


def _grads(gm, ids):
    gm.zero_grad(set_to_none=True)
    gm(input_ids=ids, labels=ids).loss.backward()
    return [p.grad.clone() for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]


def test_activation_checkpointing_gives_the_same_gradients():
    gm = randomize_(lora_fx.transform(tiny("llama"), rank=4, targets=targets("llama")), scale=0.3).train()
    ids = inputs("llama")["input_ids"]
    plain = _grads(gm, ids)
    calls = []
    gm.model.layers[1].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    assert [n for n, _ in lora_fx.distributed.blocks(gm)] == ["model.layers.0", "model.layers.1"]
    lora_fx.distributed.checkpoint_blocks_(gm)  # the model's own: activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in gm.model.layers)
    for a, b in zip(_grads(gm, ids), plain):
        assert_close(a, b)
    assert len(calls) == 2  # forward, and again in backward: really recomputed


def test_compile_whole_model_breaks_where_the_plain_model_does():
    model = tiny("gpt2")
    gm = randomize_(lora_fx.transform(model, rank=4, targets=targets("gpt2")), scale=0.3)
    kw = inputs("gpt2")
    plain = torch._dynamo.explain(model)(**kw)
    torch._dynamo.reset()
    ours = torch._dynamo.explain(gm)(**kw)
    assert (ours.graph_count, ours.graph_break_count) == (plain.graph_count, plain.graph_break_count)
    assert [str(b.reason) for b in ours.break_reasons] == [str(b.reason) for b in plain.break_reasons]


def test_compile_per_decoder_layer_fullgraph_and_hot_swap_without_recompiling():
    model = tiny("llama")
    gm = randomize_(lora_fx.transform(model, rank=4, targets=targets("llama")), scale=0.3).train()
    kw = inputs("llama")
    cnt = CompileCounterWithBackend("aot_eager")
    for layer in gm.model.layers:  # a kept decoder layer with its regions: no graph break inside
        layer.compile(fullgraph=True, backend=cnt)
    out = gm(**kw).logits
    ref = reference_call(model, gm, (), kw).logits
    assert_close(out, ref)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    factors = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    for a, b in zip(torch.autograd.grad(out, factors, gy), torch.autograd.grad(ref, factors, gy)):
        assert_close(a, b)
    frames = cnt.frame_count
    swaps = [lambda: lora_fx.set_scale_(gm, 0.5), lambda: lora_fx.enable_adapters_(gm, False),
             lambda: lora_fx.enable_adapters_(gm, True),
             lambda: lora_fx.load_adapter_values_(gm, {k: 2 * v for k, v in lora_fx.lora_state_dict(gm).items()})]
    for swap in swaps:
        swap()
        assert_close(gm(**kw).logits, reference_call(model, gm, (), kw).logits)
    assert cnt.frame_count == frames  # hot-swaps change values in place: nothing recompiles
