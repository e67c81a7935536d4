"""Training / inference benchmark: full fine-tuning vs PEFT vs loralib vs lora_fx (each lowering),
eager and torch.compile, on a GPT-2-style decoder and a small conv net (CPU).

Variants run interleaved in rounds (each round times every variant once, in an order rotated
per round, so slow drifts of a shared machine hit all of them alike); the script prints
per-variant medians, spreads (``(max - min) / median`` over rounds), the median of the per-round
ratios to full fine-tuning / to the base model with ``±`` half their range, and ``best``: the
ratio of the fastest rounds (timeit's estimator: interference only ever adds time).

    python benchmarks/bench_train.py                # the README figures (about 10 min on 1 core)
    python benchmarks/bench_train.py --quick        # smoke run, < 60 s (used by tests)
    python benchmarks/bench_train.py --help

Measured:
  * train step (forward, backward, AdamW step) time, ratio to full fine-tuning;
  * peak training memory above the model: peak RSS of a fresh process during ``--memory-steps`` (1) training steps
    minus its RSS after building the model (optimizer state, gradients, activations,
    temporaries); glibc is told to mmap every large block so RSS tracks live memory;
  * inference (``eval()``, ``no_grad``) at batch 1 and batch B, unfolded and folded
    (``lora_fx.fold``), ratio to the base model;
  * ``lora_fx.transform`` time vs bare ``torch.fx.symbolic_trace`` at several depths.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lora_fx  # noqa: E402

# ---------------------------------------------------------------------------------------------
# models


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


GPT_TARGETS = ("qkv", "proj", "fc", "out")


def _loralib_linear(r):
    import loralib

    return lambda i, o: loralib.Linear(i, o, r=r, lora_alpha=r, merge_weights=False)


def _loralib_conv(r):
    import loralib

    return lambda i, o, k, padding: loralib.Conv2d(i, o, k, padding=padding, r=r, lora_alpha=r, merge_weights=False)


def _load_base(dst: nn.Module, base: nn.Module) -> None:
    """Copy ``base``'s weights into a loralib-built twin (its keys are a superset, some renamed)."""
    sd = base.state_dict()
    own = dst.state_dict()
    for k, v in sd.items():
        key = k if k in own else k.replace("conv.weight", "conv.conv.weight").replace("conv.bias", "conv.conv.bias")
        own[key].copy_(v)


def build_variants(kind: str, args) -> tuple[nn.Module, dict[str, Callable[[], nn.Module]]]:
    """``(base model, {variant name: factory of a trainable model})``."""
    torch.manual_seed(0)
    r = args.rank
    if kind == "gpt":
        base = GPT(args.layers, args.d, args.heads, args.vocab, args.seq)
        targets = ["blocks.*.weight"]
        peft_targets = list(GPT_TARGETS)
        loralib_model = lambda: GPT(args.layers, args.d, args.heads, args.vocab, args.seq, _loralib_linear(r))
    else:
        base = ConvNet(args.conv_layers, args.channels)
        targets = ["blocks.*.conv.weight"]
        peft_targets = ["conv"]
        loralib_model = lambda: ConvNet(args.conv_layers, args.channels, conv=_loralib_conv(r))

    def full():
        m = copy.deepcopy(base)
        m.requires_grad_(True)
        return m

    def peft_():
        import peft

        cfg = peft.LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=peft_targets)
        return peft.get_peft_model(copy.deepcopy(base), cfg)

    def loralib_():
        import loralib

        m = loralib_model()
        _load_base(m, base)
        loralib.mark_only_lora_as_trainable(m)
        return m

    def fx(lowering):
        return lambda: lora_fx.transform(base, rank=r, targets=targets, lowering=lowering)

    variants = {"full": full, "peft": peft_, "loralib": loralib_}
    low = {s.lowering for s in lora_fx.sites(fx("auto")())}
    variants["fx-auto"] = fx("auto")
    if low != {"factored"}:  # factored differs from auto only where auto merged something
        variants["fx-factored"] = fx("factored")
    variants["fx-merge"] = fx("merge")
    return base, variants


def make_inputs(kind: str, args, batch: int):
    g = torch.Generator().manual_seed(1)
    if kind == "gpt":
        x = torch.randint(0, args.vocab, (batch, args.seq), generator=g)
        y = torch.randint(0, args.vocab, (batch, args.seq), generator=g)
        return x, lambda out: F.cross_entropy(out.flatten(0, 1), y.flatten())
    x = torch.randn(batch, 3, args.image, args.image, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, lambda out: F.cross_entropy(out, y)


# ---------------------------------------------------------------------------------------------
# timing


def _train_step_fn(model, x, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
        opt.step()

    return step


#: clock of the figures: "cpu" = CPU time of this process (with 1 thread: the work done, robust to
#: other processes sharing the cores), "wall" = elapsed time.  Both are recorded.
CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}


def _timed(fn, n):
    c, w = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.process_time() - c) / n, (time.perf_counter() - w) / n


def _summary(ts, clock):
    vals = [t[0] if clock == "cpu" else t[1] for t in ts]
    walls = [t[1] for t in ts]
    med = statistics.median(vals)
    return {"median_ms": 1e3 * med, "spread": (max(vals) - min(vals)) / med if med else 0.0, "n": len(vals),
            "wall_median_ms": 1e3 * statistics.median(walls)}


def run_rounds(fns: dict[str, Callable[[], None]], rounds: int, steps: int, clock: str = "cpu") -> dict[str, dict]:
    """Time every variant once per round; round ``i`` starts at variant ``i`` (rotated order, so no
    variant always runs first or right after a compilation-heavy neighbour).  Each result keeps its
    per-round times (``rounds_ms``) for paired ratios (:func:`paired_ratio`)."""
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(_timed(fns[name], steps))
    out = {k: _summary(v, clock) for k, v in times.items()}
    for k, v in times.items():
        out[k]["rounds_ms"] = [1e3 * (t[0] if clock == "cpu" else t[1]) for t in v]
    return out


def paired_ratio(res: dict, name: str, ref: str) -> tuple[float, float]:
    """Median and spread (max - min) of the per-round ratios ``name / ref`` (same round = same
    machine state, so a paired ratio is steadier than a ratio of medians)."""
    rs = [a / b for a, b in zip(res[name]["rounds_ms"], res[ref]["rounds_ms"])]
    return statistics.median(rs), max(rs) - min(rs)


def _compile(model, args):
    return torch.compile(model, backend=args.backend)


def bench_train(kind, args, log):
    base, variants = build_variants(kind, args)
    x, loss_fn = make_inputs(kind, args, args.batch)
    fns = {}
    compiled_names = set(args.compile_variants.split(",")) if args.compile_variants else set()
    for name, make in variants.items():
        fns[name] = _train_step_fn(make(), x, loss_fn)
        if name in compiled_names:
            fns[name + "+compile"] = _train_step_fn(_compile(make(), args), x, loss_fn)
    for name, fn in fns.items():  # warm-up: optimizer state, compilation (not timed)
        t = time.perf_counter()
        fn()
        fn()
        log(f"  [{kind}] warm-up {name}: {time.perf_counter() - t:.1f} s")
    res = run_rounds(fns, args.rounds, args.steps, args.clock)
    # ratios: to full fine-tuning in the same mode (eager vs compiled)
    for name, r in res.items():
        ref = "full+compile" if name.endswith("+compile") and "full+compile" in res else "full"
        r["ratio_to_full"], r["ratio_spread"] = paired_ratio(res, name, ref)
        r["ratio_best"] = min(r["rounds_ms"]) / min(res[ref]["rounds_ms"])
    return res


def bench_infer(kind, args, log):
    base, variants = build_variants(kind, args)
    out = {}
    models = {"base": copy.deepcopy(base)}
    for name in ("peft", "loralib", "fx-auto", "fx-merge"):
        models[name] = variants[name]()
    models["fx-folded"] = lora_fx.fold(models["fx-auto"])
    for m in models.values():
        m.eval()
    for batch in sorted({1, args.batch}):
        x, _ = make_inputs(kind, args, batch)
        fns = {}
        for name, m in models.items():
            fns[name] = (lambda m=m: m(x))
        compiled_names = set(args.compile_infer.split(",")) if args.compile_infer else set()
        for name in list(fns):
            if name in compiled_names:
                cm = _compile(models[name], args)
                fns[name + "+compile"] = (lambda cm=cm: cm(x))
        with torch.no_grad():
            for name, fn in fns.items():
                fn()
                fn()
            res = run_rounds(fns, args.rounds, args.infer_steps, args.clock)
        for name, r in res.items():
            ref = "base+compile" if name.endswith("+compile") and "base+compile" in res else "base"
            r["ratio_to_base"], r["ratio_spread"] = paired_ratio(res, name, ref)
            r["ratio_best"] = min(r["rounds_ms"]) / min(res[ref]["rounds_ms"])
        out[f"batch{batch}"] = res
        log(f"  [{kind}] inference batch {batch} done")
    return out


_MEM_CHILD = r"""
import json, os, sys, resource
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
sys.argv = ["x"] + {argv!r}
import benchmarks.bench_train as b
args = b.parse_args({argv!r})
def rss():
    with open("/proc/self/status") as f:
        d = dict(l.split(":", 1) for l in f)
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024
base, variants = b.build_variants({kind!r}, args)
model = variants[{name!r}]()
x, loss_fn = b.make_inputs({kind!r}, args, args.batch)
del base, variants
import gc; gc.collect()
step = b._train_step_fn(model, x, loss_fn)
before, _ = rss()
with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark
    f.write("5")
for _ in range({steps}):
    step()
_, peak = rss()
print(json.dumps({{"above_model_mib": (peak - before) / 2**20}}))
"""


def bench_memory(kind, args, names, log):
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONHASHSEED="0")
    root = os.path.dirname(HERE)
    for name in names:
        code = _MEM_CHILD.format(root=root, threads=args.threads, argv=args.argv, kind=kind, name=name,
                                 steps=args.memory_steps)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            out[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  [{kind}] memory {name}: {out[name]['above_model_mib']:.0f} MiB")
    return out


def bench_transform(args, log):
    out = {}
    lora_fx.transform(GPT(1, args.trace_d, 2, 64, 16), rank=4)  # import / first-call costs
    for n in args.trace_layers:
        torch.manual_seed(0)
        model = GPT(n, args.trace_d, 2, 64, 16)
        sym, tr, tr_shared = [], [], []
        clock = CLOCK[args.clock]
        for _ in range(args.trace_repeats):  # interleaved
            # each timing starts without the previous results' garbage, so a full collection of it
            # lands in none of them (it would otherwise fall at random into one of the three)
            gc.collect()
            t = clock()
            torch.fx.symbolic_trace(model)
            sym.append(clock() - t)
            gc.collect()
            t = clock()
            lora_fx.transform(model, rank=4, targets=["blocks.*.weight"])
            tr.append(clock() - t)
            gc.collect()
            t = clock()
            lora_fx.transform(model, rank=4, targets=["blocks.*.weight"], copy_weights=False)
            tr_shared.append(clock() - t)
        s, t1, t2 = (statistics.median(v) for v in (sym, tr, tr_shared))
        nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
        out[n] = {"nodes": nodes, "symbolic_trace_s": s, "transform_s": t1, "transform_shared_s": t2,
                  "ratio": t1 / s, "ratio_shared": t2 / s, "transform_us_per_node": 1e6 * t1 / nodes}
        log(f"  transform {n} layers: {t1:.3f} s vs symbolic_trace {s:.3f} s ({t1 / s:.2f}x)")
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds, aot_eager backend (< 60 s)")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--conv-layers", type=int, default=4)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--conv-batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1, help="train steps per timing")
    p.add_argument("--infer-steps", type=int, default=2, help="forwards per timing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--compile-variants", default="full,peft,fx-auto",
                   help="GPT train variants also timed under torch.compile ('' for none)")
    p.add_argument("--conv-compile-variants", default="", help="conv-net train variants compiled")
    p.add_argument("--compile-infer", default="", help="inference variants compiled (e.g. base,fx-auto)")
    p.add_argument("--trace-layers", type=lambda s: [int(v) for v in s.split(",")], default=[6, 24, 96])
    p.add_argument("--trace-d", type=int, default=64, help="width of the transform-time models")
    p.add_argument("--trace-repeats", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-variants", default="full,peft,loralib,fx-auto,fx-merge")
    p.add_argument("--memory-steps", type=int, default=1,
                   help="train steps in the memory probe (the first one also creates optimizer state)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--skip", default="", help="comma list of sections to skip: gpt,conv,infer,transform")
    p.add_argument("--json", default=None, help="write all results to this file")
    args = p.parse_args(argv)
    args.argv = list(argv or [])
    if args.quick:
        q = dict(d=32, layers=2, heads=2, vocab=64, batch=2, seq=16, rank=4, channels=8, conv_layers=2,
                 image=8, conv_batch=2, rounds=2, infer_steps=1, trace_layers=[2, 4], trace_repeats=1,
                 trace_d=16, compile_variants="fx-auto", memory_variants="fx-auto")
        for k, v in q.items():
            if p.get_default(k) == getattr(args, k):
                setattr(args, k, v)
        if args.backend == "inductor":
            args.backend = "aot_eager"
    return args


def _fmt_table(title, res, ratio_key):
    lines = [title, f"  {'variant':<22}{'median ms':>11}{'spread':>9}{'ratio':>8}{'±':>8}{'best':>8}"]
    for name, r in res.items():
        lines.append(f"  {name:<22}{r['median_ms']:>11.2f}{r['spread']:>9.2f}{r[ratio_key]:>8.3f}"
                     f"{r['ratio_spread'] / 2:>8.3f}{r['ratio_best']:>8.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    log = lambda s: print(s, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    res = {"config": {k: v for k, v in vars(args).items() if k != "argv"},
           "torch": torch.__version__, "threads": args.threads}
    if "gpt" not in skip:
        res["gpt_train"] = bench_train("gpt", args, log)
        print(_fmt_table(f"GPT train step (d={args.d}, {args.layers} layers, batch {args.batch}x{args.seq}, "
                         f"r={args.rank}); ratio to full FT", res["gpt_train"], "ratio_to_full"))
        if not args.no_memory:
            res["gpt_memory"] = bench_memory("gpt", args, args.memory_variants.split(","), log)
            print("GPT peak training memory above the model (MiB): "
                  + ", ".join(f"{k} {v.get('above_model_mib', float('nan')):.0f}" for k, v in res["gpt_memory"].items()))
    if "conv" not in skip:
        cargs = copy.copy(args)
        cargs.batch = args.conv_batch
        cargs.compile_variants = args.conv_compile_variants
        res["conv_train"] = bench_train("conv", cargs, log)
        print(_fmt_table(f"ConvNet train step ({args.conv_layers} conv {args.channels}ch, {args.image}px, "
                         f"batch {args.conv_batch}, r={args.rank}); ratio to full FT", res["conv_train"],
                         "ratio_to_full"))
    if "infer" not in skip:
        res["gpt_infer"] = bench_infer("gpt", args, log)
        for b, r in res["gpt_infer"].items():
            print(_fmt_table(f"GPT inference {b} (eval, no_grad); ratio to base", r, "ratio_to_base"))
    if "transform" not in skip:
        res["transform"] = bench_transform(args, log)
        print("transform() vs bare symbolic_trace (d=%d): " % args.trace_d + "; ".join(
            f"{n} layers {v['transform_s']:.3f}s / {v['symbolic_trace_s']:.3f}s = {v['ratio']:.2f}x "
            f"(shared weights {v['ratio_shared']:.2f}x, {v['transform_us_per_node']:.0f} us/node)"
            for n, v in res["transform"].items()))
    res["seconds"] = time.perf_counter() - t0
    print(f"total {res['seconds']:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
