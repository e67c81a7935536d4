"""Tiny Hugging Face models built from their default configs (random weights, nothing downloaded),
their inputs, and the LoRA targets the tests use (the attention and MLP projections, as PEFT users
name them; the default-target policy is tested elsewhere)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

__all__ = ["NAMES", "CAUSAL", "tiny", "inputs", "targets", "PEFT_TARGETS"]

NAMES = ["gpt2", "llama", "mistral", "qwen2", "gemma", "phi", "t5", "bart", "whisper", "bert", "vit"]
CAUSAL = ["gpt2", "llama", "mistral", "qwen2", "gemma", "phi"]

_DECODER = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)


def tiny(name: str, *, seed: int = 0, **config) -> torch.nn.Module:
    """A 2-layer, hidden-64 model of architecture ``name`` in eval mode; ``config`` overrides fields."""
    T = transformers
    torch.manual_seed(seed)
    if name == "gpt2":
        c = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=1,
                         eos_token_id=2, pad_token_id=0, **config)
        m = T.GPT2LMHeadModel(c)
    elif name in ("llama", "mistral", "qwen2", "gemma"):
        cls = {"llama": (T.LlamaConfig, T.LlamaForCausalLM), "mistral": (T.MistralConfig, T.MistralForCausalLM),
               "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM), "gemma": (T.GemmaConfig, T.GemmaForCausalLM)}[name]
        extra = {"head_dim": 16} if name == "gemma" else {}
        m = cls[1](cls[0](**_DECODER, **extra, **config))
    elif name == "phi":
        m = T.PhiForCausalLM(T.PhiConfig(**{k: v for k, v in _DECODER.items() if k != "num_key_value_heads"},
                                         **config))
    elif name == "t5":
        m = T.T5ForConditionalGeneration(T.T5Config(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                                    vocab_size=128, decoder_start_token_id=0, **config))
    elif name == "bart":
        m = T.BartForConditionalGeneration(T.BartConfig(
            d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=128, max_position_embeddings=64, **config))
    elif name == "whisper":
        m = T.WhisperForConditionalGeneration(T.WhisperConfig(
            d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=128, num_mel_bins=16, max_source_positions=16,
            max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1,
            **config))
    elif name == "bert":
        m = T.BertForSequenceClassification(T.BertConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=64, num_labels=3, **config))
    elif name == "vit":
        m = T.ViTForImageClassification(T.ViTConfig(
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8, num_labels=3, **config))
    else:
        raise KeyError(name)
    return m.eval()


def inputs(name: str, *, batch: int = 2, seq: int = 8, seed: int = 1) -> dict:
    """Keyword inputs for ``tiny(name)``."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return dict(pixel_values=torch.randn(batch, 3, 32, 32, generator=g))
    if name == "whisper":
        return dict(input_features=torch.randn(batch, 16, 32, generator=g),
                    decoder_input_ids=torch.randint(3, 128, (batch, 5), generator=g))
    ids = torch.randint(3, 128, (batch, seq), generator=g)
    if name in ("t5", "bart"):
        return dict(input_ids=ids, decoder_input_ids=torch.randint(3, 128, (batch, 5), generator=g))
    return dict(input_ids=ids)


_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: PEFT ``target_modules``: the attention and MLP projections of every architecture above.
PEFT_TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"], "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gemma": _LLAMA,
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"], "t5": ["q", "k", "v", "o", "wi", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "whisper": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bert": ["query", "key", "value", "dense"], "vit": ["q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"],
}


def targets(name: str) -> list[str]:
    """lora_fx ``targets`` naming the modules of ``PEFT_TARGETS[name]`` (their weights)."""
    return [f"*.{m}.weight" for m in PEFT_TARGETS[name]]
