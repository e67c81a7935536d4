"""Real models from tiny random configs (no hub, no download): HF GPT-2, Llama, BERT, ResNet and
``nn.Transformer``.  For each: transform → equal to the original at B = 0 → three AdamW steps
lower the loss on a fixed batch → fold → torch.export of the folded model → parity."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from _reference import reference_call
from _tolerance import assert_close

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()

V, T = 40, 6


def _gpt2():
    cfg = tf.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=V, n_positions=16, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return tf.GPT2LMHeadModel(cfg), (torch.randint(0, V, (2, T)),), {}, lambda o: o.logits, "lm"


def _llama():
    cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=V, max_position_embeddings=16, use_cache=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg), (torch.randint(0, V, (2, T)),), {}, lambda o: o.logits, "lm"


def _bert():
    cfg = tf.BertConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=V, max_position_embeddings=16, num_labels=3, pad_token_id=0)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, -2:] = 0
    return (tf.BertForSequenceClassification(cfg), (torch.randint(1, V, (2, T)),), {"attention_mask": mask},
            lambda o: o.logits, "cls")


def _resnet():
    cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 12], depths=[1, 1], layer_type="basic", num_labels=3,
                          num_channels=3)
    return tf.ResNetForImageClassification(cfg), (torch.randn(2, 3, 16, 16),), {}, lambda o: o.logits, "cls"


def _transformer():
    m = nn.Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=24)
    return m, (torch.randn(5, 2, 16), torch.randn(4, 2, 16)), {}, lambda o: o, "mse"


MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "resnet": _resnet, "nn.Transformer": _transformer}


def _loss(out, kind, target):
    if kind == "lm":
        return F.cross_entropy(out.flatten(0, 1), target.flatten())
    if kind == "cls":
        return F.cross_entropy(out, target)
    return F.mse_loss(out, target)


def _is_lora(key):
    return key.startswith("lora.") or ".lora." in key


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_zoo_transform_train_fold_export(name):
    torch.manual_seed(0)
    model, args, kwargs, logits, kind = MODELS[name]()
    gm = lora_fx.transform(model, rank=4, alpha=8, example_inputs=args, example_kwargs=kwargs)
    assert gm.meta["lora_fx_frontend"] == "export"  # torch.fx cannot trace any of these
    assert {k for k in gm.state_dict() if not _is_lora(k)} == set(model.state_dict())
    assert len(lora_fx.sites(gm)) >= 4
    model.eval(), gm.eval()
    with torch.no_grad():
        out0, ref0 = logits(gm(*args, **kwargs)), logits(model(*args, **kwargs))
    assert_close(out0, ref0, ulps=4)  # B = 0: the original function (a few roundings: other kernels)

    g = torch.Generator().manual_seed(1)
    target = (torch.randint(0, out0.shape[-1], out0.shape[:-1], generator=g) if kind != "mse"
              else torch.randn(out0.shape, generator=g))
    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():
        before = _loss(logits(gm(*args, **kwargs)), kind, target).item()
    gm.train()
    for _ in range(3):
        torch.manual_seed(2)  # same dropout masks each step: a fixed batch
        loss = _loss(logits(gm(*args, **kwargs)), kind, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    gm.eval()
    with torch.no_grad():
        after = _loss(logits(gm(*args, **kwargs)), kind, target).item()
    assert after < before

    # after training A and B are non-zero: compare with W + s·B@A through the original model (tied
    # aliases such as GPT-2's wte / lm_head get one tensor), with the buffers training moved
    buffers = dict(gm.named_buffers())  # batch-norm statistics
    moved = {k: buffers[k] for k, _ in model.named_buffers() if k in buffers}
    out = logits(gm(*args, **kwargs))
    ref = logits(reference_call(model, gm, args, kwargs, extra=moved))
    assert_close(out, ref)
    site = lora_fx.sites(gm)[-1]
    # a random linear functional of the output: sum(out²) through a final LayerNorm (nn.Transformer)
    # has an identically zero gradient (Σ x̂² is constant), which would compare rounding noise
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    g_out = torch.autograd.grad((out * gy).sum(), [site.lora_A, site.lora_B])
    g_ref = torch.autograd.grad((ref * gy).sum(), [site.lora_A, site.lora_B])
    for a, b in zip(g_out, g_ref):
        assert_close(a, b)
    assert all(not p.requires_grad for n, p in gm.named_parameters() if not _is_lora(n))

    # folds a copy, exports, checks parity; dynamic shapes (the default) for GPT-2, static (faster) for the rest
    ep = lora_fx.export_folded(gm, args, example_kwargs=kwargs, dynamic_shapes=None if name == "gpt2" else False)
    assert set(ep.state_dict) <= set(model.state_dict()) and not any(_is_lora(k) for k in ep.state_dict)
    with torch.no_grad():
        assert_close(logits(ep.module()(*args, **kwargs)), logits(gm(*args, **kwargs)))
    assert any(_is_lora(k) for k in gm.state_dict())  # the live model keeps its adapters
    if name == "gpt2":  # captured with batch 2 × 6 tokens; dynamic shapes run 8 × 9
        x8 = torch.randint(0, V, (8, 9))
        with torch.no_grad():
            assert_close(logits(ep.module()(x8)), logits(gm(x8)))
