"""The main job: LoRA fine-tuning of a small conv net on scikit-learn's digits (no download).

1. Pretrain a conv net on digits 0-4.
2. ``lora_fx.transform`` it; train only the adapters to classify digits 5-9.
3. Report held-out accuracy on 5-9 before and after, the trainable fraction, save the adapter,
   fold it, and check the folded model against the adapted one.

The last line of stdout is one JSON object.  ``python examples/finetune_digits.py --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from tqdm import tqdm

import lora_fx
from lora_fx.io import load_lora_state, save_lora_state


class ConvNet(nn.Module):
    """A small CNN for 8×8 digit images: ``(N, 1, 8, 8) -> (N, 10)`` logits."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 16, 128)
        self.head = nn.Linear(128, 10)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.drop(F.relu(self.fc(x.flatten(1))))
        return self.head(x)


def load_split(seed: int):
    """Digits as float tensors ``(N, 1, 8, 8)`` in [0, 1]; a fixed 70/30 train/test split."""
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = int(0.7 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def subset(xy, classes):
    x, y = xy
    keep = torch.isin(y, torch.tensor(classes))
    return x[keep], y[keep]


def accuracy(model: nn.Module, xy) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(xy[0]).argmax(-1) == xy[1]).float().mean())


def train(model: nn.Module, params, xy, epochs: int, lr: float, desc: str, seed: int, show: bool) -> None:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    x, y = xy
    model.train()
    for _ in tqdm(range(epochs), desc=desc, file=sys.stderr, disable=not show):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx], label_smoothing=0.1)  # bounded logits
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for the adapter file (default: a temp dir)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    show = not args.no_progress
    train_xy, test_xy = load_split(args.seed)
    old, new = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]

    base = ConvNet(args.width)
    train(base, base.parameters(), subset(train_xy, old), args.pretrain_epochs, 3e-3, "pretrain 0-4", args.seed, show)
    print(f"pretrained: accuracy on held-out 0-4 = {accuracy(base, subset(test_xy, old)):.3f}")
    base_acc = accuracy(base, subset(test_xy, new))

    gm = lora_fx.transform(base, rank=args.rank, alpha=args.alpha)
    trainable = sum(p.numel() for p in gm.parameters() if p.requires_grad)
    total = sum(p.numel() for p in gm.parameters())
    for s in lora_fx.sites(gm):
        print(f"  site {s.param:<14} {s.op:<8} {str(tuple(s.shape)):<18} rank {s.rank} ({s.lowering})")
    train(gm, [p for p in gm.parameters() if p.requires_grad], subset(train_xy, new), args.epochs, args.lr,
          "LoRA 5-9", args.seed + 1, show)
    lora_acc = accuracy(gm, subset(test_xy, new))

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="lora_fx_digits_"))
    path = save_lora_state(gm, out_dir / "digits_adapter.safetensors")
    reloaded = lora_fx.transform(base, rank=args.rank, alpha=args.alpha)
    load_lora_state(reloaded, path)

    folded = lora_fx.fold(gm)
    folded.eval()
    gm.eval()
    reloaded.eval()
    with torch.no_grad():
        x = test_xy[0]
        fold_diff = float((folded(x) - gm(x)).abs().max())
        reload_diff = float((reloaded(x) - gm(x)).abs().max())
    plain = ConvNet(args.width)
    plain.load_state_dict(folded.state_dict(), strict=True)
    result = {
        "base_accuracy": round(base_acc, 4),
        "lora_accuracy": round(lora_acc, 4),
        "trainable_fraction": round(trainable / total, 4),
        "trainable_params": trainable,
        "total_params": total,
        "fold_max_abs_diff": fold_diff,
        "reload_max_abs_diff": reload_diff,
        "adapter_file": str(path),
        "adapter_bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(f"held-out 5-9 accuracy: base {base_acc:.3f} -> LoRA {lora_acc:.3f}; "
          f"trainable {trainable}/{total} ({100 * trainable / total:.1f} %); fold diff {fold_diff:.2e}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
