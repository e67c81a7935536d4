"""Tiny mixture-of-experts models for the expert-adapter and routing tests (E = 4, hidden 32)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

E, H, I, K = 4, 32, 48, 2
TINY = dict(vocab_size=96, hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, use_cache=False, bos_token_id=0, eos_token_id=1,
            pad_token_id=2)


def _random(cls, cfg, impl: str, seed: int) -> nn.Module:
    """``cls(cfg)`` with ``experts_implementation = impl`` and seeded N(0, 0.1) weights."""
    cfg._experts_implementation = impl
    torch.manual_seed(seed)
    ex = cls(cfg)
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.1)
    return ex


def mixtral_experts(impl: str = "grouped_mm", *, dtype=torch.float32, seed: int = 0) -> nn.Module:
    """A transformers ``MixtralExperts`` (``gate_up_proj (E, 2I, H)``, ``down_proj (E, H, I)``) with
    random non-zero weights and ``experts_implementation = impl``."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K)
    return _random(MixtralExperts, cfg, impl, seed).to(dtype)


def gpt_oss_experts(impl: str = "grouped_mm", *, seed: int = 0) -> nn.Module:
    """A transformers ``GptOssExperts``: transposed stacks ``(E, in, out)`` with per-expert biases."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return _random(GptOssExperts, cfg, impl, seed)


class MoEBlock(nn.Module):
    """``x → in_proj → top-2 router → experts → out``; the experts module is called with
    ``(hidden (T, H), top_k_index (T, K), top_k_weights (T, K))`` as transformers' are."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.in_proj = nn.Linear(H, H)
        self.router = nn.Linear(H, E, bias=False)
        self.experts = experts

    def forward(self, x):
        h = self.in_proj(x).reshape(-1, H)
        w, idx = torch.topk(F.softmax(self.router(h), dim=-1), K, dim=-1)
        return x + self.experts(h, idx, w.to(h.dtype)).reshape(x.shape)


class LoopExperts(nn.Module):
    """Research-code experts that torch.fx traces: a Python loop over ``F.linear(x, W[e])``."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(E, I, H) * 0.1)
        self.w_out = nn.Parameter(torch.randn(E, H, I) * 0.1)

    def forward(self, h, idx, w):
        out = torch.zeros_like(h)
        for e in range(E):
            gate = ((idx == e).to(h.dtype) * w).sum(-1, keepdim=True)
            out = out + gate * F.linear(F.silu(F.linear(h, self.w_in[e])), self.w_out[e])
        return out


def hf_moe_model(name: str, *, impl: str | None = None, seed: int = 0) -> nn.Module:
    """A tiny transformers Mixtral, Qwen3-MoE or OLMoE causal LM (default config otherwise)."""
    import transformers as tf

    kw = {} if impl is None else {"experts_implementation": impl}
    if name == "mixtral":
        cfg, cls = tf.MixtralConfig(**TINY, num_local_experts=E, num_experts_per_tok=K, **kw), tf.MixtralForCausalLM
    elif name == "qwen3_moe":
        cfg, cls = tf.Qwen3MoeConfig(**TINY, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=24,
                                     head_dim=8, **kw), tf.Qwen3MoeForCausalLM
    else:
        cfg, cls = tf.OlmoeConfig(**TINY, num_experts=E, num_experts_per_tok=K, **kw), tf.OlmoeForCausalLM
    torch.manual_seed(seed)
    return cls(cfg).eval()
