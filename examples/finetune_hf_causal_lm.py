"""LoRA fine-tuning of a Hugging Face Llama on text, then ``generate()`` (no download, no GPU).

1. Build a character-level corpus from the docstrings of a few Python standard-library modules
   (text that ships with Python itself) and a tiny ``LlamaForCausalLM`` from a config.
2. ``lora_fx.transform(model, rank=...)`` with no example inputs: the result is still a
   ``LlamaForCausalLM`` (its ``generate``, KV cache, ``config`` and ``save_pretrained`` included);
   only the adapters train: on the attention and MLP projections, the embedding and the LM head.
3. Train with AdamW and a tqdm bar, plot the loss curve (PNG), and ``generate()`` a sample.
4. Save the adapter as a PEFT folder, fold it into a plain ``LlamaForCausalLM``, ``save_pretrained``
   that, load it back with ``from_pretrained`` and check it generates the same tokens.

The last line of stdout is one JSON object.  ``python examples/finetune_hf_causal_lm.py --help``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

import lora_fx

MODULES = ("json", "textwrap", "argparse", "collections", "pathlib", "functools", "itertools", "string")
SPECIALS = ("<pad>", "<bos>", "<eos>")


def corpus() -> str:
    """Docstrings of the standard-library ``MODULES`` and of their public functions and classes."""
    import importlib

    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        parts.append(inspect.getdoc(mod) or "")
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr)
            if not attr.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)):
                parts.append(inspect.getdoc(obj) or "")
    text = "\n\n".join(p for p in parts if p)
    return "".join(c for c in text if c.isprintable() or c == "\n")


class CharTokenizer:
    """Characters ↔ ids; ids 0–2 are ``<pad>``, ``<bos>``, ``<eos>``."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars) + len(SPECIALS)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.index[c] for c in text])

    def decode(self, ids) -> str:
        return "".join(self.chars[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))


def windows(data: torch.Tensor, n: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """``(n, seq)`` random windows of ``data``."""
    starts = torch.randint(0, len(data) - seq, (n,), generator=g)
    return torch.stack([data[s:s + seq] for s in starts.tolist()])


@torch.no_grad()
def held_out_loss(model, data: torch.Tensor, seq: int, batches: int = 4) -> float:
    g = torch.Generator().manual_seed(1234)
    model.eval()
    losses = [model(input_ids=(ids := windows(data, 16, seq, g)), labels=ids).loss.item() for _ in range(batches)]
    model.train()
    return sum(losses) / len(losses)


def plot(losses: list[float], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8, label="training loss")
    k = max(1, len(losses) // 20)
    if len(losses) > k:
        smooth = [sum(losses[i:i + k]) / k for i in range(len(losses) - k + 1)]
        ax.plot(range(k - 1, len(losses)), smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / character)")
    ax.set_title("LoRA fine-tuning of a tiny LlamaForCausalLM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a tiny model runs fastest on one)")
    p.add_argument("--new-tokens", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for the plot, adapter and model (default: temp)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    out = args.out or Path(tempfile.mkdtemp(prefix="lora_fx_llama_"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    text = corpus()
    tok = CharTokenizer(text)
    data = tok.encode(text)
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=len(tok),
                         max_position_embeddings=args.seq + args.new_tokens, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2)
    base = LlamaForCausalLM(config)  # a real checkpoint: LlamaForCausalLM.from_pretrained(name)
    model = lora_fx.transform(base, rank=args.rank, alpha=2 * args.rank,
                              targets=["*_proj.weight", "model.embed_tokens.weight", "lm_head.weight"])
    assert type(model) is LlamaForCausalLM  # the model it was, with adapters in it
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())

    opt = torch.optim.AdamW(lora_fx.adapter_parameters(model), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))  # 20 warm-up steps
    g = torch.Generator().manual_seed(args.seed)
    before = held_out_loss(model, held, args.seq)
    model.train()
    losses = []
    bar = tqdm(range(args.steps), desc="LoRA", disable=args.no_progress, file=sys.stderr)
    for _ in bar:
        ids = windows(train, args.batch, args.seq, g)
        loss = model(input_ids=ids, labels=ids).loss  # the model's own causal-LM loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    after = held_out_loss(model, held, args.seq)
    plot_path = plot(losses, out / "loss.png")

    model.eval()
    prompt = tok.encode("Return a ").unsqueeze(0)
    gen = dict(max_new_tokens=args.new_tokens, do_sample=True, top_k=8, pad_token_id=0)
    torch.manual_seed(args.seed)
    sample = model.generate(input_ids=prompt, **gen)  # with the KV cache, adapters active

    adapter_dir = lora_fx.save_adapter(model, out / "adapter")  # PEFT: adapter_model.safetensors + config
    merged = lora_fx.fold(model)  # a plain LlamaForCausalLM with W + ΔW
    merged.save_pretrained(out / "merged")
    reloaded = LlamaForCausalLM.from_pretrained(out / "merged").eval()
    torch.manual_seed(args.seed)  # the same sampling draws: the same tokens
    same = torch.equal(reloaded.generate(input_ids=prompt, **gen), sample)

    res = {
        "loss_before": round(before, 4), "loss_after": round(after, 4), "trainable_fraction": trainable / total,
        "steps": args.steps, "sample": tok.decode(sample[0].tolist()), "generate_matches_folded": bool(same),
        "model_class": type(model).__name__, "frontend": lora_fx.state.frontend_of(model),
        "plot": str(plot_path), "adapter": str(adapter_dir), "merged": str(out / "merged"),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
