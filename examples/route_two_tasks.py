"""Two task adapters trained together in one mixed batch (``lora_fx.route_adapters``), no download.

1. Pretrain a small MLP on scikit-learn's digits (label = the digit).
2. Add two adapters of different ranks and alphas for two new tasks on the same images:
   ``plus1`` (label = digit + 1 mod 10) and ``mirror`` (label = 9 - digit).
3. Train both at once: every batch mixes samples of the two tasks, and
   ``with lora_fx.route_adapters(model, names):`` sends each sample through its task's adapter
   (gradients reach only the adapter its sample used), in one forward and one backward.
4. Evaluate each adapter alone on its task, and check that a routed mixed batch computes exactly
   what each adapter computes alone on its samples.

The last line of stdout is one JSON object.  ``python examples/route_two_tasks.py --help``.
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
from tqdm import tqdm

import lora_fx

TASKS = {"plus1": lambda y: (y + 1) % 10, "mirror": lambda y: 9 - y}


class MLP(nn.Module):
    """``(N, 64) -> (N, 10)`` logits."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def load_split(seed: int):
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.7 * len(y))
    return (x[perm[:cut]], y[perm[:cut]]), (x[perm[cut:]], y[perm[cut:]])


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--pretrain-epochs", type=int, default=20)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    (x, y), (xt, yt) = load_split(args.seed)

    base = MLP(args.width)
    opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
    for _ in range(args.pretrain_epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            loss = F.cross_entropy(base(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    base.eval()

    # two adapters (different ranks and alphas) on every linear layer
    model = lora_fx.transform(base, rank=4, alpha=8.0, adapter_name="plus1")
    lora_fx.add_adapter(model, "mirror", rank=8, alpha=8.0)
    params = [p for s in lora_fx.sites(model) for p in (s.lora_A, s.lora_B)]
    for p_ in params:
        p_.requires_grad_(True)
    before = {t: accuracy(base, xt, f(yt)) for t, f in TASKS.items()}

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    model.train()
    for _ in tqdm(range(args.epochs), desc="two tasks, mixed batches", file=sys.stderr, disable=args.no_progress):
        for idx in torch.randperm(len(y), generator=g).split(64):
            names = ["plus1" if i % 2 else "mirror" for i in range(len(idx))]  # half of each task
            labels = torch.stack([TASKS[n](y[i]) for n, i in zip(names, idx.tolist())])
            with lora_fx.route_adapters(model, names):
                loss = F.cross_entropy(model(x[idx]), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()

    after = {}
    for task, f in TASKS.items():
        lora_fx.set_active_adapters(model, task)
        after[task] = accuracy(model, xt, f(yt))
    names = ["plus1", "mirror", None] * (len(yt) // 3) + ["plus1"] * (len(yt) % 3)
    with torch.no_grad():
        with lora_fx.route_adapters(model, names):
            routed = model(xt)
        alone = torch.empty_like(routed)
        for task in (*TASKS, None):  # each adapter alone on its samples; None: the base model
            rows = [i for i, n in enumerate(names) if n == task]
            lora_fx.set_active_adapters(model, [] if task is None else task)
            alone[rows] = model(xt[rows])
    routed_diff = float((routed - alone).abs().max())
    result = {
        "accuracy_before": {t: round(v, 4) for t, v in before.items()},
        "accuracy_after": {t: round(v, 4) for t, v in after.items()},
        "routed_vs_alone_max_abs_diff": routed_diff,
        "seconds": round(time.perf_counter() - start, 2),
    }
    print("accuracy per task, base -> its adapter: " + ", ".join(
        f"{t} {before[t]:.3f} -> {after[t]:.3f}" for t in TASKS) + f"; routed batch vs each alone {routed_diff:.1e}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
