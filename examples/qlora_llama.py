"""QLoRA on a small Llama: a 4-bit NF4 base, LoRA adapters trained on top, folded, generating.

1. Build a small Llama from its config (random weights: nothing is downloaded) and save it, as a
   checkpoint on disk would be.
2. Load it quantized, the way transformers users do: ``from_pretrained(...,
   quantization_config=TorchAoConfig(NF4WeightOnlyConfig()))`` (``--quant bnb-nf4``: bitsandbytes'
   ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``).
3. ``lora_fx.transform`` it: the model keeps its class (``generate`` and all) and every projection
   gets an adapter on top of its quantized kernel; train the adapters to continue a counting
   sequence (token ``t`` is followed by ``t + 1``), with a progress bar.
4. Fold the adapters into plain bf16 weights, check the folded model against the adapted one,
   ``save_pretrained`` the float model, and generate.

The last line of stdout is one JSON object.  ``python examples/qlora_llama.py --help``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

import lora_fx
from lora_fx import weights

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_checkpoint(path: Path, args) -> None:
    """A random Llama of the requested size, saved in bf16 with ``save_pretrained``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=4 * args.seq, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def load_quantized(path: Path, quant: str):
    """``from_pretrained`` with a quantization config: the base QLoRA trains on."""
    import transformers

    if quant == "bnb-nf4":
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig

        config = transformers.TorchAoConfig(NF4WeightOnlyConfig())
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                              dtype=torch.bfloat16)
    return model.eval()


def counting_batch(batch: int, seq: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences ``s, s+1, s+2, ...`` over tokens ``3 .. vocab-1`` (wrapping around)."""
    span = vocab - 3
    start = torch.randint(0, span, (batch, 1), generator=generator)
    return 3 + (start + torch.arange(seq)) % span


def continuation_accuracy(model, args, generator: torch.Generator) -> float:
    """Greedy ``generate`` from 4 counting tokens: the fraction of the next 6 tokens that count on."""
    prompts = counting_batch(8, 4, args.vocab, generator)
    with torch.no_grad():
        out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
    want = counting_batch_from(prompts[:, -1:], 6, args.vocab)
    return float((out[:, 4:] == want).float().mean())


def counting_batch_from(last: torch.Tensor, n: int, vocab: int) -> torch.Tensor:
    span = vocab - 3
    return 3 + (last - 3 + 1 + torch.arange(n)) % span


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", choices=["torchao-nf4", "bnb-nf4"], default="torchao-nf4")
    p.add_argument("--hidden", type=int, default=128, help="hidden size (NF4 needs weights of 64·256·k elements)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default=None, help="folder for the checkpoints (default: a temporary one)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp(prefix="qlora_llama_"))
    logging.getLogger("transformers").setLevel(logging.ERROR)  # loading reports
    warnings.filterwarnings("ignore", module="torchao")

    build_checkpoint(out / "base", args)
    model = load_quantized(out / "base", args.quant)
    gm = lora_fx.transform(model, rank=args.rank, alpha=2 * args.rank, targets=[f"*.{n}.weight" for n in PROJECTIONS])
    del model  # lora_fx adapts a copy; the copy is all we need from here on

    g = torch.Generator().manual_seed(args.seed + 1)
    acc_before = continuation_accuracy(gm, args, torch.Generator().manual_seed(99))
    opt = torch.optim.AdamW(lora_fx.adapter_parameters(gm), lr=args.lr)
    gm.train()
    losses = []
    bar = tqdm(range(args.steps), desc=f"QLoRA ({args.quant})", file=sys.stderr, disable=args.no_progress)
    for _ in bar:
        ids = counting_batch(args.batch, args.seq, args.vocab, g)
        loss = gm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    gm.eval()
    acc_after = continuation_accuracy(gm, args, torch.Generator().manual_seed(99))

    folded = lora_fx.fold(gm)  # bf16 nn.Linear weights: dequantize(W) + ΔW, rounded once
    ids = counting_batch(4, args.seq, args.vocab, torch.Generator().manual_seed(7))
    with torch.no_grad():
        fold_diff = (folded(input_ids=ids).logits.float() - gm(input_ids=ids).logits.float()).abs().max().item()
    folded.save_pretrained(out / "folded")  # a plain bf16 checkpoint: from_pretrained needs no quantization
    prompt = counting_batch(1, 4, args.vocab, torch.Generator().manual_seed(3))
    with torch.no_grad():
        sample = folded.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                                 do_sample=False, pad_token_id=0)
    base_weights = sum(weights.nbytes(p) for n, p in gm.named_parameters() if ".layers." in n and "lora" not in n)
    float_weights = sum(p.numel() * 2 for n, p in folded.named_parameters() if ".layers." in n)
    res = {
        "quant": args.quant,
        "sites": len(lora_fx.sites(gm)),
        "loss_before": round(losses[0], 4),
        "loss_after": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "continuation_accuracy_before": acc_before,
        "continuation_accuracy_after": acc_after,
        "decoder_weight_bytes_vs_bf16": round(base_weights / float_weights, 3),
        "trainable_fraction": round(sum(p.numel() for p in lora_fx.adapter_parameters(gm))
                                    / sum(p.numel() for p in folded.parameters()), 4),
        "fold_max_abs_diff": fold_diff,
        "prompt": prompt[0].tolist(),
        "generated": sample[0, 4:].tolist(),
        "folded_dir": str(out / "folded"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
