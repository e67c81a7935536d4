"""LoRA fine-tuning of a tiny GPT-2 (transformers, random config, no download) end to end.

1. Build ``GPT2LMHeadModel`` from a small config; torch.fx cannot trace it, so
   ``lora_fx.transform(..., example_inputs=(ids,))`` captures it with torch.export.
2. Train only the adapters on a synthetic language (each token is the previous one plus a
   fixed step, modulo the vocabulary) with AdamW and a tqdm progress bar.
3. Report held-out loss and next-token accuracy before and after, save the adapter
   (safetensors), fold it, export the folded model (``lora_fx.export_folded``: a ``.pt2`` file with
   a parity check) and run the exported program on a batch of another size.

The last line of stdout is one JSON object.  ``python examples/finetune_transformers.py --help``.
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
from lora_fx.io import save_lora_state


def synthetic_batch(n: int, seq: int, vocab: int, step: int, g: torch.Generator) -> torch.Tensor:
    """``(n, seq)`` token ids: a random start, then ``x[t+1] = (x[t] + step) % vocab``."""
    start = torch.randint(0, vocab, (n, 1), generator=g)
    return (start + step * torch.arange(seq)) % vocab


def lm_loss(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy and accuracy of ``model(ids).logits`` on ``ids[:, 1:]``."""
    logits = model(ids).logits[:, :-1]
    target = ids[:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
    return loss, (logits.argmax(-1) == target).float().mean()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-embd", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=97)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for the adapter and .pt2 files (default: temp)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    cfg = GPT2Config(n_embd=args.n_embd, n_layer=args.layers, n_head=args.heads, vocab_size=args.vocab,
                     n_positions=max(64, 2 * args.seq), use_cache=False, bos_token_id=0, eos_token_id=0)
    base = GPT2LMHeadModel(cfg)
    held_out = synthetic_batch(64, args.seq, args.vocab, 3, g)

    gm = lora_fx.transform(base, rank=args.rank, alpha=args.alpha, example_inputs=(held_out[:2],))
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in gm.parameters())
    print(f"front-end: {gm.meta['lora_fx_frontend']}; {len(lora_fx.sites(gm))} sites, e.g. "
          + ", ".join(f"{s.param} ({s.op}, {s.lowering})" for s in lora_fx.sites(gm)[:3]))
    gm.eval()
    with torch.no_grad():
        loss0, acc0 = (float(v) for v in lm_loss(gm, held_out))

    opt = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    gm.train()
    bar = tqdm(range(args.steps), desc="LoRA GPT-2", file=sys.stderr, disable=args.no_progress)
    for _ in bar:
        loss, _ = lm_loss(gm, synthetic_batch(args.batch, args.seq, args.vocab, 3, g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    gm.eval()
    with torch.no_grad():
        loss1, acc1 = (float(v) for v in lm_loss(gm, held_out))

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="lora_fx_gpt2_"))
    adapter = save_lora_state(gm, out_dir / "gpt2_adapter.safetensors")
    ep = lora_fx.export_folded(gm, (held_out[:2],), path=str(out_dir / "gpt2_folded.pt2"))
    other = held_out[:5, : args.seq - 3]  # another batch and sequence size: dynamic shapes
    with torch.no_grad():
        export_diff = float((ep.module()(other).logits - gm(other).logits).abs().max())
    plain = GPT2LMHeadModel(cfg)
    plain.load_state_dict(lora_fx.fold(gm).state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        fold_diff = float((plain(held_out).logits - gm(held_out).logits).abs().max())
    result = {
        "frontend": gm.meta["lora_fx_frontend"],
        "loss_before": round(loss0, 4),
        "loss_after": round(loss1, 4),
        "accuracy_before": round(acc0, 4),
        "accuracy_after": round(acc1, 4),
        "trainable_fraction": round(trainable / total, 4),
        "fold_max_abs_diff": fold_diff,
        "export_max_abs_diff": export_diff,
        "adapter_bytes": adapter.stat().st_size,
        "pt2_bytes": (out_dir / "gpt2_folded.pt2").stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(f"held-out loss {loss0:.3f} -> {loss1:.3f}, next-token accuracy {acc0:.3f} -> {acc1:.3f}; "
          f"trainable {trainable}/{total}; folded export diff {export_diff:.2e}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
