"""The digits LoRA job (examples/finetune_digits.py) data-parallel on several ranks with DDP.

Run it with torchrun (CPU, gloo, 2 ranks on this machine)::

    torchrun --nnodes 1 --nproc-per-node 2 --master-addr 127.0.0.1 --master-port 29517 \\
        examples/ddp_finetune.py

or without torchrun (``--nproc 2`` starts the ranks itself on 127.0.0.1).  Rank 0 pretrains the
conv net on digits 0-4 and broadcasts it; every rank builds the same adapted model
(``lora_fx.transform``), wraps it in ``DistributedDataParallel(find_unused_parameters=False)``
and trains the adapters on its half of every batch of digits 5-9; rank 0 then saves the
adapter-only state (safetensors), folds the model and checks it.  The last line rank 0 prints is
one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_digits import ConvNet, accuracy, load_split, subset, train  # noqa: E402

import lora_fx  # noqa: E402
from lora_fx.distributed import unwrap  # noqa: E402
from lora_fx.io import load_lora_state, save_lora_state  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--pretrain-epochs", type=int, default=15)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch", type=int, default=64, help="global batch size (split across ranks)")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=2, help="ranks to start when not launched by torchrun")
    p.add_argument("--backend", default="gloo")
    p.add_argument("--out", type=Path, default=None, help="folder for the adapter file (default: a temp dir)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds the self-started ranks may take before they are stopped")
    return p.parse_args(argv)


def _broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


def run(args: argparse.Namespace) -> dict | None:
    """The job on an initialised process group; returns the result on rank 0, None elsewhere."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, world = dist.get_rank(), dist.get_world_size()
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    show = rank == 0 and not args.no_progress
    train_xy, test_xy = load_split(args.seed)
    old, new = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]

    base = ConvNet(args.width)
    if rank == 0:
        train(base, base.parameters(), subset(train_xy, old), args.pretrain_epochs, 3e-3, "pretrain 0-4",
              args.seed, show)
    _broadcast_module_(base)
    base_acc = accuracy(base, subset(test_xy, new))

    torch.manual_seed(args.seed + 1)  # identical adapter initialisation on every rank
    gm = lora_fx.transform(base, rank=args.rank, alpha=args.alpha)
    lora_fx.mark_only_lora_as_trainable(gm)
    ddp = DDP(gm, find_unused_parameters=False)
    opt = torch.optim.AdamW([p for p in ddp.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    x, y = subset(train_xy, new)
    g = torch.Generator().manual_seed(args.seed + 2)  # same order on every rank; each takes its slice
    per_rank = args.batch // world
    steps = 0
    ddp.train()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(y), generator=g).split(args.batch):
            if len(idx) < args.batch:  # equal shards on every rank: drop the ragged last batch
                continue
            mine = idx[rank * per_rank:(rank + 1) * per_rank]
            loss = F.cross_entropy(ddp(x[mine]), y[mine])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    model = unwrap(ddp)
    lora_acc = accuracy(model, subset(test_xy, new))
    sd = lora_fx.distributed.gather_lora_state_dict(ddp)
    same = torch.tensor([float(sum(v.double().sum() for v in sd.values()))])
    gathered = [torch.zeros(1, dtype=same.dtype) for _ in range(world)]
    dist.all_gather(gathered, same)
    if rank != 0:
        return None

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="lora_fx_ddp_digits_"))
    path = save_lora_state(model, out_dir / "digits_adapter.safetensors")
    reloaded = load_lora_state(lora_fx.transform(base, rank=args.rank, alpha=args.alpha), path)
    folded = lora_fx.fold(model).eval()
    reloaded.eval()
    with torch.no_grad():
        xt = test_xy[0]
        fold_diff = float((folded(xt) - model(xt)).abs().max())
        reload_diff = float((reloaded(xt) - model(xt)).abs().max())
    plain = ConvNet(args.width)
    plain.load_state_dict(folded.state_dict(), strict=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "world_size": world,
        "steps": steps,
        "base_accuracy": round(base_acc, 4),
        "lora_accuracy": round(lora_acc, 4),
        "ranks_agree": all(bool(t == gathered[0]) for t in gathered),
        "trainable_fraction": round(trainable / total, 4),
        "fold_max_abs_diff": fold_diff,
        "reload_max_abs_diff": reload_diff,
        "adapter_file": str(path),
        "adapter_bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(args: argparse.Namespace) -> dict | None:
    """What every rank runs: join the process group described by torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and run the job."""
    torch.set_num_threads(1)
    dist.init_process_group(args.backend, timeout=timedelta(seconds=120))
    try:
        return run(args)
    finally:
        gc.collect()  # the DDP reducer dies before the process group (a gloo group freed first can block)
        dist.destroy_process_group()


def _rank_main(rank: int, world: int, port: int, args: argparse.Namespace, result_file: str) -> None:
    """A self-started rank: set the environment torchrun would set (127.0.0.1 only), then run."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    result = _rank_entry(args)
    if result is not None:
        Path(result_file).write_text(json.dumps(result))


def main(argv=None) -> dict | None:
    """Under torchrun (``RANK``/``WORLD_SIZE`` set): run this rank.  Otherwise start ``--nproc``
    ranks on 127.0.0.1 (fork where available) and return rank 0's result."""
    args = parse(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        result = _rank_entry(args)
    else:
        import importlib

        import torch.multiprocessing as mp

        importlib.import_module("torch._dynamo")  # DDP imports it: import once here, before forking
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        with tempfile.TemporaryDirectory() as tmp:
            result_file = os.path.join(tmp, "result.json")
            ranks = mp.start_processes(_rank_main, args=(args.nproc, _free_port(), args, result_file),
                                       nprocs=args.nproc, join=False, start_method=method)
            deadline = time.monotonic() + args.timeout
            while not ranks.join(timeout=5):
                if time.monotonic() > deadline:
                    for p in ranks.processes:
                        p.kill()
                    raise TimeoutError(f"ranks ran past --timeout {args.timeout:g} s and were stopped")
            result = json.loads(Path(result_file).read_text())
    if result is not None:
        print(f"{result['world_size']} ranks: held-out 5-9 accuracy base {result['base_accuracy']:.3f} -> "
              f"LoRA {result['lora_accuracy']:.3f}; fold diff {result['fold_max_abs_diff']:.2e}")
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
