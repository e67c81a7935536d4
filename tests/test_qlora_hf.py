"""Hugging Face models quantized the way users do it (a tiny Llama saved with ``save_pretrained``, then
``from_pretrained(..., quantization_config=BitsAndBytesConfig / TorchAoConfig)``): ``transform``
keeps the class and adapts every projection on its quantized kernel, exact against the functional
reference on the library-dequantized weights; a PEFT adapter trained by real PEFT on the 4-bit base
gives PEFT's logits, loss, gradients and tokens in lora_fx; gradient checkpointing, ``generate``,
fold to a float model and its ``save_pretrained`` round trip."""

from __future__ import annotations

import pytest
import torch

import lora_fx

from _quantized import float_twin, quiet_import, saved_float_bytes
from _reference import randomize_, reference_call
from _tolerance import EXACT, assert_close

transformers = quiet_import("transformers")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGETS = [f"*.{p}.weight" for p in PROJ]
# NF4 (torchao) needs weights whose size divides by 64·256: hidden 128, as many kv heads as heads
CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=256, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG)).to(torch.bfloat16).save_pretrained(path)
    return path


def _load(path, how: str):
    if how == "bnb-nf4":
        quiet_import("bitsandbytes")
        q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.bfloat16)
    elif how == "bnb-int8":
        quiet_import("bitsandbytes")
        q = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        quiet_import("torchao")
        from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig

        q = transformers.TorchAoConfig(NF4WeightOnlyConfig())
    with quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu",
                                                                  dtype=torch.bfloat16)
    return model.eval()


class quiet_transformers:
    """transformers logs a loading report and bitsandbytes / torchao warnings while loading."""

    def __enter__(self):
        self.level = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        return self

    def __exit__(self, *exc):
        transformers.logging.set_verbosity(self.level)
        return False


def _no_cpu_repack_(model):
    """As on lora_fx's copies: no in-place CPU repack (block scales rounded to bf16) in eval."""
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            m.support_avx512bf16_for_cpu = False


def _ids(seed=1, batch=2, seq=8):
    return torch.randint(3, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("how", ["bnb-nf4", "torchao-nf4", "bnb-int8"])
def test_kept_class_exact_against_the_dequantized_reference(checkpoint, how):
    model = _load(checkpoint, how)
    twin = float_twin(model)
    gm = lora_fx.transform(model, rank=4, alpha=8, targets=TARGETS)
    assert type(gm) is transformers.LlamaForCausalLM and hasattr(gm, "generate")
    sites = lora_fx.sites(gm)
    assert len(sites) == 14 and {s.lowering for s in sites} == {"factored"}
    assert {s.shape for s in sites} == {(128, 128), (256, 128), (128, 256)}  # logical shapes, not packed storage
    randomize_(gm, scale=0.05)
    gm.train()
    twin.train()
    ids = _ids()
    leaves = {(s.param, s.adapter): (s.lora_A.detach().clone().requires_grad_(True),
                                     s.lora_B.detach().clone().requires_grad_(True)) for s in sites}
    out = gm(input_ids=ids).logits
    ref = reference_call(twin, gm, (), {"input_ids": ids}, factors=leaves).logits
    assert_close(out, ref, dtype=torch.bfloat16)
    got = torch.autograd.grad(out.float().square().mean(), [p for s in sites for p in (s.lora_A, s.lora_B)])
    want = torch.autograd.grad(ref.float().square().mean(), [p for s in sites for p in leaves[(s.param, s.adapter)]])
    for g, w in zip(got, want):
        assert_close(g, w, dtype=torch.bfloat16, ulps=16)


def test_a_fresh_adapter_on_an_8bit_base_is_the_base_model_bit_for_bit_in_eval_and_train(checkpoint):
    """bitsandbytes' Linear8bitLt computes LLM.int8 (the input quantized) in eval mode and dequantizes
    in training on CPU; lora_fx's copies do the same, so B = 0 gives the base model's logits in both."""
    base = _load(checkpoint, "bnb-int8")
    gm = lora_fx.transform(base, rank=4, targets=TARGETS)
    ids = _ids()
    for mode in ("eval", "train"):
        getattr(base, mode)(), getattr(gm, mode)()
        with torch.no_grad():
            assert torch.equal(gm(input_ids=ids).logits, base(input_ids=ids).logits), mode
    gm.eval()  # eval with gradients: bitsandbytes' int8 kernel has an input gradient
    randomize_(gm, scale=0.05)
    gm(input_ids=ids).logits.float().square().mean().backward()
    assert all(s.lora_A.grad is not None and s.lora_A.grad.abs().sum() > 0 for s in lora_fx.sites(gm))


@pytest.mark.parametrize("how", ["bnb-nf4", "torchao-nf4"])
def test_no_weight_sized_float_copy_is_saved_for_backward(checkpoint, how):
    gm = lora_fx.transform(_load(checkpoint, how), rank=4, targets=TARGETS).train()
    ids = _ids(batch=1)  # logits (8, 256) fp32: smaller than half a weight
    losses = []
    found = saved_float_bytes(lambda: losses.append(gm(input_ids=ids, labels=ids).loss), 128 * 128 * 2 // 2, gm)
    assert found == [], found  # (the activations of this batch are far smaller than a weight)
    losses[0].backward()


def test_a_peft_adapter_trained_on_the_4bit_base_gives_peft_outputs_and_tokens(checkpoint, tmp_path):
    peft = quiet_import("peft")
    base = _load(checkpoint, "bnb-nf4")
    peft_base = _load(checkpoint, "bnb-nf4")
    for m in peft_base.modules():  # PEFT's model must not repack in place either (see docs/qlora.md)
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    torch.manual_seed(0)
    pm = peft.get_peft_model(peft_base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for step in range(3):
        ids = _ids(10 + step)
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    pm.save_pretrained(tmp_path)
    gm = lora_fx.load_adapter(base, tmp_path)
    assert type(gm) is transformers.LlamaForCausalLM and len(lora_fx.sites(gm)) == 14
    ids = _ids()
    pm.train(), gm.train()
    a, b = pm(input_ids=ids, labels=ids), gm(input_ids=ids, labels=ids)
    assert_close(b.logits, a.logits, **EXACT)  # the same kernels in the same order
    a.loss.backward()
    b.loss.backward()
    peft_grads = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    for s in lora_fx.sites(gm):
        module = s.param[: -len(".weight")]
        assert_close(s.lora_A.grad, peft_grads[f"base_model.model.{module}.lora_A.default.weight"], dtype=torch.float32)
        assert_close(s.lora_B.grad, peft_grads[f"base_model.model.{module}.lora_B.default.weight"], dtype=torch.float32)
    pm.eval(), gm.eval()
    prompt = _ids(3, seq=5)
    with torch.no_grad():
        want = pm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        got = gm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_checkpointing_generate_fold_and_save_pretrained(checkpoint, tmp_path):
    model = _load(checkpoint, "bnb-nf4")
    gm = randomize_(lora_fx.transform(model, rank=4, alpha=8, targets=TARGETS), scale=0.05)
    ids = _ids()

    def grads():
        gm.zero_grad(set_to_none=True)
        gm(input_ids=ids, labels=ids).loss.backward()
        return {s.param: (s.lora_A.grad.clone(), s.lora_B.grad.clone()) for s in lora_fx.sites(gm)}

    gm.train()
    plain = grads()
    gm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert_close(grads(), plain, **EXACT)
    gm.activation_checkpointing_disable()
    gm.eval()
    folded = lora_fx.fold(gm)
    assert type(folded) is transformers.LlamaForCausalLM
    assert type(folded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert folded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    prompt = _ids(4, seq=5)
    with torch.no_grad():
        assert_close(folded(input_ids=ids).logits, gm(input_ids=ids).logits, dtype=torch.bfloat16)
        tokens = gm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
        assert torch.equal(folded.generate(input_ids=prompt, max_new_tokens=6, do_sample=False), tokens)
    folded.save_pretrained(tmp_path)
    with quiet_transformers():
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert not hasattr(again.config, "quantization_config")  # a plain float checkpoint
    with torch.no_grad():
        assert_close(again(input_ids=ids).logits, folded(input_ids=ids).logits, **EXACT)
    requantized = lora_fx.fold(gm, requantize=True)
    layer = requantized.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and requantized.config.quantization_config is not None
    errors = requantized.lora_fx_fold["requantization_error"]
    assert len(errors) == 14 and all(0 < e["mean"] < e["max"] for e in errors.values())
    with torch.no_grad():
        requantized.generate(input_ids=prompt, max_new_tokens=3, do_sample=False)


def test_an_adapter_made_on_the_4bit_model_loads_on_the_float_model(checkpoint, tmp_path):
    gm = randomize_(lora_fx.transform(_load(checkpoint, "bnb-nf4"), rank=4, alpha=8, targets=TARGETS), scale=0.05)
    lora_fx.save_adapter(gm, tmp_path)
    with quiet_transformers():
        float_model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    gf = lora_fx.load_adapter(float_model, tmp_path)
    assert_close(lora_fx.lora_state_dict(gf), lora_fx.lora_state_dict(gm), **EXACT)
    ids = _ids()
    with torch.no_grad():
        assert_close(gf(input_ids=ids).logits, reference_call(float_model, gf, (), {"input_ids": ids}).logits,
                     dtype=torch.bfloat16)


def test_trainer_trains_and_saves_the_adapted_4bit_model(checkpoint, tmp_path):
    """transformers' Trainer refuses "purely quantized" models; lora_fx's copy carries trainable
    adapters, so it trains and checkpoints; the user's model keeps its flag."""
    model = _load(checkpoint, "bnb-nf4")
    gm = lora_fx.transform(model, rank=4, alpha=8, targets=TARGETS)
    assert model.is_quantized and not gm.is_quantized
    rows = [{"input_ids": r, "labels": r} for r in _ids(seed=3, batch=4, seq=8)]
    args = transformers.TrainingArguments(str(tmp_path), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2,
                                          save_steps=2, report_to=[], use_cpu=True, logging_steps=1)
    before = {s.param: s.lora_B.detach().clone() for s in lora_fx.sites(gm)}
    with quiet_transformers():
        transformers.Trainer(model=gm, args=args, train_dataset=rows).train()
    assert any(not torch.equal(s.lora_B, before[s.param]) for s in lora_fx.sites(gm))
    assert (tmp_path / "checkpoint-2").is_dir()
    requantized = lora_fx.fold(gm, requantize=True)
    assert requantized.is_quantized  # still quantized: the flag is back
    assert "is_quantized" not in lora_fx.fold(gm).__dict__  # a float model


def test_a_partly_folded_4bit_model_saves_a_checkpoint_whose_float_layers_load_as_float(checkpoint, tmp_path):
    model = _load(checkpoint, "bnb-nf4")
    gm = randomize_(lora_fx.transform(model, rank=4, alpha=8, targets=["*.q_proj.weight"]), scale=0.05)
    folded = lora_fx.fold(gm)
    assert type(folded.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(folded.model.layers[0].self_attn.k_proj).__name__ == "Linear4bit"
    assert model.config.quantization_config.llm_int8_skip_modules is None  # the user's config: untouched
    folded.save_pretrained(tmp_path)
    with quiet_transformers():
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu", dtype=torch.bfloat16)
    assert type(again.model.layers[1].self_attn.q_proj) is torch.nn.Linear
    assert type(again.model.layers[1].self_attn.k_proj).__name__ == "Linear4bit"
    _no_cpu_repack_(again)
    ids = _ids()
    with torch.no_grad():
        assert_close(again.eval()(input_ids=ids).logits, folded.eval()(input_ids=ids).logits, **EXACT)


def test_a_4bit_gpt2_folds_into_conv1d_layers_that_load_into_the_float_model(tmp_path):
    quiet_import("bitsandbytes")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=256, n_positions=32, bos_token_id=0,
                                  eos_token_id=0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "float")
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                        bnb_4bit_compute_dtype=torch.float32)
    with quiet_transformers():
        model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "float", quantization_config=q,
                                                             device_map="cpu", dtype=torch.float32).eval()
    gm = randomize_(lora_fx.transform(model, rank=4, targets=["*.c_attn.weight", "*.c_proj.weight"]), scale=0.05)
    folded = lora_fx.fold(gm)
    attn = folded.transformer.h[0].attn
    assert type(attn.c_proj) is transformers.pytorch_utils.Conv1D and tuple(attn.c_attn.weight.shape) == (64, 192)
    ids = _ids(seq=6)
    with torch.no_grad():
        assert_close(folded(input_ids=ids).logits, gm(input_ids=ids).logits, dtype=torch.float32)
    folded.save_pretrained(tmp_path / "folded")
    with quiet_transformers():
        again = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "folded", device_map="cpu").eval()
    assert type(again.transformer.h[0].attn.c_attn) is transformers.pytorch_utils.Conv1D  # c_fc: still 4-bit
    _no_cpu_repack_(again)
    with torch.no_grad():
        assert_close(again(input_ids=ids).logits, folded(input_ids=ids).logits, **EXACT)
