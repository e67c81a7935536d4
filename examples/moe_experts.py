"""Per-expert LoRA on a tiny Mixtral (transformers, random config, no download): fine-tune its experts.

1. Build ``MixtralForCausalLM`` from a small config (top-2 of E experts; transformers' default
   ``grouped_mm`` experts) and transform it: it keeps its classes, and the kept ``MixtralExperts``
   modules run transformers' own experts code on the adapted stacks.
2. Target the expert stacks by name (``*.experts.gate_up_proj``, ``*.experts.down_proj``): each
   stack ``(E, out, in)`` gets one adapter pair per expert, ``A (E, r, in)``, ``B (E, out, r)``,
   computed factored per expert (no ``(E, out, in)`` delta in any forward).
3. Train only those adapters on a synthetic language (each token is the previous plus a fixed
   step); report held-out loss before and after.
4. Save the adapter in HF PEFT's format (``target_parameters``; ``PeftModel.from_pretrained``
   loads it) and load it back as a second adapter; fold it into the weights and load them
   strictly into a plain Mixtral: same logits.

The last line of stdout is one JSON object.  ``python examples/moe_experts.py --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import lora_fx

TARGETS = ["*.experts.gate_up_proj", "*.experts.down_proj"]


def synthetic_batch(n: int, seq: int, vocab: int, step: int, g: torch.Generator) -> torch.Tensor:
    """``(n, seq)`` token ids: a random start, then ``x[t+1] = (x[t] + step) % vocab``."""
    start = torch.randint(0, vocab, (n, 1), generator=g)
    return (start + step * torch.arange(seq)) % vocab


def lm_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of ``model(ids).logits`` on ``ids[:, 1:]``."""
    logits = model(ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=97)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for the adapter files (default: temp)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    cfg = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                        num_local_experts=args.experts, num_experts_per_tok=2, max_position_embeddings=64)
    base = MixtralForCausalLM(cfg).eval()
    held_out = synthetic_batch(64, args.seq, args.vocab, 3, g)

    gm = lora_fx.transform(base, rank=args.rank, targets=TARGETS)  # the model keeps its classes
    assert type(gm) is MixtralForCausalLM and type(gm.model.layers[0].mlp.experts) is type(base.model.layers[0].mlp.experts)
    sites = lora_fx.sites(gm)
    print(f"{len(sites)} expert stacks adapted, e.g. {sites[0].param} {sites[0].shape}: {sites[0].op}, "
          f"{sites[0].lowering}, lora_A {tuple(sites[0].lora_A.shape)}, lora_B {tuple(sites[0].lora_B.shape)}")
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in gm.parameters())
    with torch.no_grad():
        loss0 = float(lm_loss(gm, held_out))

    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    gm.train()
    bar = tqdm(range(args.steps), desc="LoRA Mixtral experts", file=sys.stderr, disable=args.no_progress)
    for _ in bar:
        loss = lm_loss(gm, synthetic_batch(args.batch, args.seq, args.vocab, 3, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    gm.eval()
    with torch.no_grad():
        loss1 = float(lm_loss(gm, held_out))
        want = gm(held_out, use_cache=False).logits

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="lora_fx_moe_"))
    lora_fx.save_adapter(gm, out_dir / "peft_adapter")  # target_parameters: PeftModel.from_pretrained loads it
    config = json.loads((out_dir / "peft_adapter" / "adapter_config.json").read_text())
    plain = MixtralForCausalLM(cfg).eval()
    plain.load_state_dict(lora_fx.fold(gm).state_dict(), strict=True)
    lora_fx.load_adapter(gm, out_dir / "peft_adapter", adapter_name="reloaded")  # a second adapter, now active
    with torch.no_grad():
        reload_diff = float((gm(held_out, use_cache=False).logits - want).abs().max())
        fold_diff = float((plain(held_out).logits - want).abs().max())
    result = {
        "loss_before": round(loss0, 4),
        "loss_after": round(loss1, 4),
        "stacks": len(sites),
        "lowerings": sorted({s.lowering for s in sites}),
        "trainable_fraction": round(trainable / total, 4),
        "peft_target_parameters": config["target_parameters"],
        "reload_max_abs_diff": reload_diff,
        "fold_max_abs_diff": fold_diff,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(f"held-out loss {loss0:.3f} -> {loss1:.3f}; trainable {trainable}/{total}; PEFT file reloaded "
          f"(max |Δ| {reload_diff:.1e}); folded into a plain Mixtral (max |Δ| {fold_diff:.1e})")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
