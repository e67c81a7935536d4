"""LoRA on attention only: q and v blocks of ``nn.MultiheadAttention.in_proj_weight`` plus
``out_proj``, in a tiny transformer classifier on scikit-learn's digits (no download).

1. Pretrain a one-layer ``nn.TransformerEncoderLayer`` classifier (each 8×8 image is 8 tokens of
   8 pixels) on digits 0-4.
2. ``lora_fx.transform`` it with ``fused={"*.in_proj_weight": {"enable": ("q", "v")}}``: k's rows
   get no adapter and stay exactly as pretrained; train the adapters (and the new head) on 5-9.
3. Fold and compare the folded model with the adapted one.

The last line of stdout is one JSON object.  ``python examples/attention_qv.py --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import lora_fx


class DigitTransformer(nn.Module):
    """``(N, 8, 8)`` images → ``(N, 10)`` logits: rows are tokens."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Parameter(torch.randn(8, dim) * 0.02)
        self.layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        h = self.layer(self.embed(x) + self.pos)
        return self.head(h.mean(1))


def _data(lo: int, hi: int):
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    keep = (y >= lo) & (y <= hi)
    x, y = x[keep], y[keep]
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    cut = int(0.8 * len(y))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def _train(model, params, data, epochs: int, lr: float):
    opt = torch.optim.AdamW(params, lr=lr)
    x, y = data
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def _accuracy(model, data) -> float:
    model.eval()
    x, y = data
    return float((model(x).argmax(-1) == y).float().mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=15)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = DigitTransformer(args.dim)
    pre_train, _ = _data(0, 4)
    _train(model, model.parameters(), pre_train, args.pretrain_epochs, 3e-3)
    train, test = _data(5, 9)
    base_acc = _accuracy(model, test)

    gm = lora_fx.transform(model, rank=args.rank, targets=["*.in_proj_weight", "*.out_proj.weight", "head.weight"],
                           fused={"*.in_proj_weight": {"enable": ("q", "v")}})
    gm.get_parameter("head.bias").requires_grad_(True)  # the new classes need their own bias
    params = [p for p in gm.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    _train(gm, params, train, args.epochs, 1e-2)
    lora_acc = _accuracy(gm, test)

    folded = lora_fx.fold(gm).eval()
    x = test[0]
    with torch.no_grad():
        diff = float((folded(x) - gm(x)).abs().max())
    E = args.dim
    k_rows = slice(E, 2 * E)
    k_untouched = bool(torch.equal(folded.layer.self_attn.in_proj_weight[k_rows],
                                   model.layer.self_attn.in_proj_weight[k_rows]))
    out_site = [s for s in lora_fx.sites(gm) if s.param.endswith("out_proj.weight")][0]
    res = {"base_accuracy": round(base_acc, 3), "lora_accuracy": round(lora_acc, 3),
           "trainable_fraction": round(n_train / sum(p.numel() for p in model.parameters()), 3),
           "fold_max_abs_diff": diff, "k_rows_untouched": k_untouched,
           "out_proj_trained": bool(out_site.lora_B.abs().sum() > 0),
           "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
