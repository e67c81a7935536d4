"""The benchmark's models (plain ``torch.nn``, random weights, nothing downloaded) and their inputs.

* :class:`GPT`: a GPT-2-style decoder (pre-LN, fused qkv, 4x GELU MLP); LoRA targets qkv, proj, fc, out.
* :class:`Llama`: a Llama-style decoder in plain nn, what Hugging Face ``LlamaForCausalLM`` computes
  minus rotary embeddings: RMSNorm, separate q/k/v/o projections without bias, a SwiGLU MLP
  (gate, up, down).  q/k/v read one input and gate/up another, as in the Hugging Face model;
  LoRA targets all seven projections.
* :class:`ConvNet`: a stem and residual 3x3 convolutions; LoRA targets the block convolutions.
* :func:`hf_llama`: the Hugging Face ``LlamaForCausalLM`` built from a config of the same size
  (its section runs where ``lora_fx.transform`` accepts the model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Block", "GPT", "GPT_TARGETS", "LlamaBlock", "Llama", "LLAMA_TARGETS", "ConvBlock", "ConvNet",
           "hf_llama", "make_inputs"]

GPT_TARGETS = ("qkv", "proj", "fc", "out")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Block(nn.Module):
    """GPT-2 block: pre-LN causal self-attention (fused qkv) and a 4x GELU MLP."""

    def __init__(self, d: int, heads: int, linear=nn.Linear):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = linear(d, 3 * d)
        self.proj = linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = linear(d, 4 * d)
        self.out = linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        shape = (B, T, self.heads, C // self.heads)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, vocab: int, ctx: int, linear=nn.Linear):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads, linear) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


class LlamaBlock(nn.Module):
    """Llama decoder layer without rotary embeddings: RMSNorm, q/k/v/o attention, SwiGLU MLP."""

    def __init__(self, d: int, heads: int, inter: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.input_layernorm = nn.RMSNorm(d, eps=eps)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(d, eps=eps)
        self.gate_proj = nn.Linear(d, inter, bias=False)
        self.up_proj = nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        h = self.input_layernorm(x)
        shape = (B, T, self.heads, C // self.heads)
        q = self.q_proj(h).view(shape).transpose(1, 2)
        k = self.k_proj(h).view(shape).transpose(1, 2)
        v = self.v_proj(h).view(shape).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.o_proj(a)
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class Llama(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, inter: int, vocab: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(LlamaBlock(d, heads, inter) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.embed_tokens(idx)
        for b in self.layers:
            x = b(x)
        return self.lm_head(self.norm(x))


def hf_llama(layers: int, d: int, heads: int, inter: int, vocab: int, ctx: int) -> nn.Module:
    """Hugging Face ``LlamaForCausalLM`` of the given size, random weights (a config, no download);
    SDPA attention, no KV cache, logits only."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=ctx,
                      attn_implementation="sdpa", use_cache=False, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


class ConvBlock(nn.Module):
    def __init__(self, c: int, conv=nn.Conv2d):
        super().__init__()
        self.conv = conv(c, c, 3, padding=1)

    def forward(self, x):
        return x + F.relu(self.conv(x))


class ConvNet(nn.Module):
    def __init__(self, layers: int, c: int, classes: int = 10, conv=nn.Conv2d):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList(ConvBlock(c, conv) for _ in range(layers))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for b in self.blocks:
            x = b(x)
        return self.head(x.mean((2, 3)))


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits  # a Hugging Face ModelOutput


def make_inputs(kind: str, args, batch: int):
    """``(input, loss_fn(model output) -> scalar)``, seeded: token ids and next-token targets for
    the language models, images and labels for the conv net."""
    g = torch.Generator().manual_seed(1)
    if kind in ("gpt", "llama", "hf-llama"):
        x = torch.randint(0, args.vocab, (batch, args.seq), generator=g)
        y = torch.randint(0, args.vocab, (batch, args.seq), generator=g)
        return x, lambda out: F.cross_entropy(_logits(out).flatten(0, 1), y.flatten())
    x = torch.randn(batch, 3, args.image, args.image, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, lambda out: F.cross_entropy(out, y)
