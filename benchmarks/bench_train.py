"""Training / inference benchmark: full fine-tuning vs PEFT vs loralib vs lora_fx (each lowering),
eager and torch.compile, on a GPT-2-style decoder, a Llama-style decoder, the Hugging Face Llama
(where lora_fx can transform it) and a small conv net (CPU).

Variants run interleaved in rounds (each round times every variant once, in an order rotated
per round, so slow drifts of a shared machine hit all of them alike).  Every table row gives the
median of the per-round ratios to full fine-tuning and to PEFT (same mode: compiled rows against
compiled references) with a 95 % bootstrap interval, and ``best``: the ratio of the fastest rounds
(timeit's estimator: interference only ever adds time).  Under each table the script prints the
difference the run resolves (:mod:`benchmarks.stats`).

    python benchmarks/bench_train.py                # everything (see docs/benchmarks.md for the time)
    python benchmarks/bench_train.py --quick        # smoke run, < 60 s (used by tests)
    python benchmarks/bench_train.py --help

Measured:
  * train step (forward, backward, AdamW step) time, ratio to full fine-tuning and to PEFT;
  * peak training memory above the model, eager and compiled, one fresh process per variant:
    build the model (compile it), run one forward and backward (where compilation happens), free
    the gradients and record RSS; then reset the high-water mark and run ``--memory-steps`` (1)
    training steps (the first also creates the optimizer state); report peak RSS minus the recorded
    RSS.  glibc is told to mmap every large block so RSS tracks live memory;
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
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lora_fx  # noqa: E402
from benchmarks.results import write_results  # noqa: E402
from benchmarks.models import (GPT, GPT_TARGETS, LLAMA_TARGETS, Block, ConvBlock, ConvNet, Llama,  # noqa: E402,F401
                               hf_llama, make_inputs)
from benchmarks.stats import CLOCK, paired, paired_ratio, resolution, run_rounds  # noqa: E402,F401

#: the language models of the train sections (``--models``)
LMS = ("gpt", "llama", "hf-llama")
TITLES = {"gpt": "GPT", "llama": "Llama-style (plain nn)", "hf-llama": "Hugging Face Llama", "conv": "ConvNet"}


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


class Skipped(Exception):
    """A section cannot run here (the reason is recorded in the results)."""


def build_variants(kind: str, args) -> tuple[nn.Module, dict[str, Callable[[], nn.Module]]]:
    """``(base model, {variant name: factory of a trainable model})``.  ``fx-norecompute`` is lora_fx
    ``auto`` with ``recompute_inputs=False`` (it keeps the adapter inputs, as PEFT does).

    Raises:
        Skipped: ``kind == "hf-llama"`` and ``lora_fx.transform`` cannot take the model here."""
    torch.manual_seed(0)
    r = args.rank
    loralib_model = None
    if kind == "gpt":
        base = GPT(args.layers, args.d, args.heads, args.vocab, args.seq)
        targets, peft_targets = ["blocks.*.weight"], list(GPT_TARGETS)
        loralib_model = lambda: GPT(args.layers, args.d, args.heads, args.vocab, args.seq, _loralib_linear(r))  # noqa: E731
    elif kind == "llama":
        base = Llama(args.layers, args.d, args.heads, args.inter, args.vocab)
        targets, peft_targets = [f"layers.*.{t}.weight" for t in LLAMA_TARGETS], list(LLAMA_TARGETS)
    elif kind == "hf-llama":
        base = hf_llama(args.layers, args.d, args.heads, args.inter, args.vocab, args.seq)
        targets, peft_targets = [f"*.{t}.weight" for t in LLAMA_TARGETS], list(LLAMA_TARGETS)
        # the model keeps its class (lora_fx.regions); should transform refuse it (a transformers
        # version whose Llama it cannot capture), the section is recorded as skipped with the error
        try:
            lora_fx.transform(base, rank=r, targets=targets, copy_weights=False)
        except lora_fx.LoraFxError as e:
            raise Skipped(f"lora_fx.transform(LlamaForCausalLM) failed: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:160]}") from e
    else:
        base = ConvNet(args.conv_layers, args.channels)
        targets, peft_targets = ["blocks.*.conv.weight"], ["conv"]
        loralib_model = lambda: ConvNet(args.conv_layers, args.channels, conv=_loralib_conv(r))  # noqa: E731

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

    def fx(lowering, **kw):
        return lambda: lora_fx.transform(base, rank=r, targets=targets, lowering=lowering, **kw)

    variants = {"full": full, "peft": peft_}
    if loralib_model is not None:
        variants["loralib"] = loralib_
    variants["fx-auto"] = fx("auto")
    if kind in ("gpt", "conv"):
        if {s.lowering for s in lora_fx.sites(fx("auto")())} != {"factored"}:  # differs only where auto merged
            variants["fx-factored"] = fx("factored")
        variants["fx-merge"] = fx("merge")
    variants["fx-norecompute"] = fx("auto", recompute_inputs=False)
    return base, variants


# ---------------------------------------------------------------------------------------------
# timing


def _train_step_fn(model, x, loss_fn):
    """One AdamW training step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x)).backward()
        opt.step()

    return step


def _compile(model, args):
    return torch.compile(model, backend=args.backend)


def _split(names: str) -> list[str]:
    return [n for n in names.split(",") if n]


def _add_ratios(res: dict, refs: tuple[str, ...]) -> list[dict]:
    """Ratios of every row to each reference of its mode (``name+compile`` rows to ``ref+compile``
    where that ran); returns the paired results of the non-reference rows (for the resolution)."""
    pairs = []
    for name, r in res.items():
        compiled = name.endswith("+compile")
        for ref in refs:
            key = ref + "+compile" if compiled and ref + "+compile" in res else ref
            if key not in res:
                continue
            p = paired(res, name, key)
            r[f"ratio_to_{ref}"], r[f"ci95_to_{ref}"] = p["ratio"], p["ci95"]
            if "ratio_best" not in r:  # to the first reference that ran
                r["ratio_best"], r["ratio_spread"] = p["best"], p["spread"]
            if name != key:
                pairs.append(p)
    return pairs


def bench_train(kind, args, log, variant_names, compile_names):
    base, variants = build_variants(kind, args)
    x, loss_fn = make_inputs(kind, args, args.batch)
    fns = {}
    for name in variant_names:
        if name not in variants:
            continue
        fns[name] = _train_step_fn(variants[name](), x, loss_fn)
        if name in compile_names:
            fns[name + "+compile"] = _train_step_fn(_compile(variants[name](), args), x, loss_fn)
    for name, fn in fns.items():  # warm-up: optimizer state, compilation (not timed)
        t = time.perf_counter()
        fn()
        fn()
        log(f"  [{kind}] warm-up {name}: {time.perf_counter() - t:.1f} s")
    res = run_rounds(fns, args.rounds, args.steps, args.clock)
    res["_resolution"] = resolution(_add_ratios(res, ("full", "peft")))
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
        for name in list(fns):
            if name in _split(args.compile_infer):
                cm = _compile(models[name], args)
                fns[name + "+compile"] = (lambda cm=cm: cm(x))
        with torch.no_grad():
            for name, fn in fns.items():
                fn()
                fn()
            res = run_rounds(fns, args.rounds, args.infer_steps, args.clock)
        res["_resolution"] = resolution(_add_ratios(res, ("base",)))
        out[f"batch{batch}"] = res
        log(f"  [{kind}] inference batch {batch} done")
    return out


_MEM_CHILD = r"""
import gc, json, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
import benchmarks.bench_train as b
args = b.parse_args({argv!r})
from benchmarks.memory import reset_peak, rss
base, variants = b.build_variants({kind!r}, args)
model = variants[{name!r}]()
if {compiled!r}:
    model = b._compile(model, args)
x, loss_fn = b.make_inputs({kind!r}, args, args.batch)
del base, variants
t = time.perf_counter()
loss_fn(model(x)).backward()  # warm-up: compilation happens here
warmup_s = time.perf_counter() - t
for p in model.parameters():
    p.grad = None
step = b._train_step_fn(model, x, loss_fn)
gc.collect()
before, _ = rss()
reset_peak()  # the high-water mark from here
for _ in range({steps}):
    step()
_, peak = rss()
print(json.dumps({{"above_model_mib": (peak - before) / 2**20, "warmup_s": warmup_s}}))
"""


def bench_memory(kind, args, names, log):
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONHASHSEED="0")
    root = os.path.dirname(HERE)
    for name in names:
        base_name = name[: -len("+compile")] if name.endswith("+compile") else name
        code = _MEM_CHILD.format(root=root, threads=args.threads, argv=args.argv, kind=kind, name=base_name,
                                 compiled=name != base_name, steps=args.memory_steps)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            out[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
            log(f"  [{kind}] memory {name}: failed {out[name]['error']}")
            continue
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  [{kind}] memory {name}: {out[name]['above_model_mib']:.0f} MiB (warm-up {out[name]['warmup_s']:.0f} s)")
    for name, r in out.items():  # ratios to PEFT in the same mode
        ref = "peft+compile" if name.endswith("+compile") else "peft"
        if "above_model_mib" in r and "above_model_mib" in out.get(ref, {}):
            r["ratio_to_peft"] = r["above_model_mib"] / out[ref]["above_model_mib"]
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
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds, aot_eager backend, one memory probe")
    p.add_argument("--models", default="gpt,llama,hf-llama", help="language models of the train sections")
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--inter", type=int, default=1376, help="Llama MLP width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--conv-layers", type=int, default=4)
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--conv-batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--infer-rounds", type=int, default=None, help="rounds of the inference section (default --rounds)")
    p.add_argument("--steps", type=int, default=1, help="train steps per timing")
    p.add_argument("--infer-steps", type=int, default=2, help="forwards per timing")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--train-variants", default="full,peft,loralib,fx-auto,fx-merge",
                   help="train variants timed (those a model has)")
    p.add_argument("--compile-variants", default="full,peft,fx-auto",
                   help="language-model train variants also timed under torch.compile ('' for none)")
    p.add_argument("--conv-compile-variants", default="", help="conv-net train variants compiled")
    p.add_argument("--compile-infer", default="", help="inference variants compiled (e.g. base,fx-auto)")
    p.add_argument("--trace-layers", type=lambda s: [int(v) for v in s.split(",")], default=[6, 24, 96])
    p.add_argument("--trace-d", type=int, default=64, help="width of the transform-time models")
    p.add_argument("--trace-repeats", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-variants",
                   default="full,peft,loralib,fx-auto,fx-merge,fx-norecompute,"
                           "peft+compile,fx-auto+compile,fx-norecompute+compile",
                   help="memory probes per language model (those a model has; name+compile: compiled)")
    p.add_argument("--memory-models", default="gpt,llama,hf-llama", help="language models whose memory is probed")
    p.add_argument("--memory-steps", type=int, default=1,
                   help="train steps in the memory probe (the first one also creates optimizer state)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--skip", default="", help="comma list of sections to skip: gpt,llama,hf-llama,conv,infer,transform, "
                        "train (the language models' train timing; their memory probes still run)")
    p.add_argument("--json", default=None, help="write all results to this file")
    args = p.parse_args(argv)
    args.argv = list(argv or [])
    if args.quick:
        q = dict(d=32, layers=2, heads=2, vocab=64, inter=48, batch=2, seq=16, rank=4, channels=8, conv_layers=2,
                 image=8, conv_batch=2, rounds=2, infer_steps=1, trace_layers=[2, 4], trace_repeats=1,
                 trace_d=16, compile_variants="fx-auto", memory_variants="fx-auto+compile", memory_models="gpt")
        for k, v in q.items():
            if p.get_default(k) == getattr(args, k):
                setattr(args, k, v)
        if args.backend == "inductor":
            args.backend = "aot_eager"
    return args


def _interval(r, ref):
    if f"ratio_to_{ref}" not in r:
        return f"{'':>22}"
    lo, hi = r[f"ci95_to_{ref}"]
    return f"{r[f'ratio_to_{ref}']:>7.3f} [{lo:.3f}, {hi:.3f}]"


def _fmt_table(title, res, refs=("full", "peft")):
    head = "".join(f"{'÷ ' + ref + ' [95% CI]':>23}" for ref in refs)
    lines = [title, f"  {'variant':<24}{'median ms':>10}{'spread':>8}{head}{'best':>8}"]
    for name, r in res.items():
        if name.startswith("_"):
            continue
        cols = "".join(f" {_interval(r, ref)}" for ref in refs)
        lines.append(f"  {name:<24}{r['median_ms']:>10.1f}{r['spread']:>8.2f}{cols}{r.get('ratio_best', 1.0):>8.3f}")
    lines.append(f"  this run resolves differences of ±{100 * res['_resolution']:.1f} % (median half-width of "
                 f"the paired 95 % intervals, {args_rounds(res)} rounds)")
    return "\n".join(lines)


def args_rounds(res) -> int:
    return next(r["n"] for k, r in res.items() if not k.startswith("_"))


def _fmt_memory(kind, mem):
    parts = []
    for k, v in mem.items():
        if "above_model_mib" not in v:
            parts.append(f"{k} failed")
            continue
        ratio = f" ({v['ratio_to_peft']:.2f}× PEFT)" if "ratio_to_peft" in v and not k.startswith("peft") else ""
        parts.append(f"{k} {v['above_model_mib']:.0f}{ratio}")
    return f"{TITLES[kind]} peak training memory above the model (MiB): " + ", ".join(parts)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(_split(args.skip))
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    res = {"config": {k: v for k, v in vars(args).items() if k != "argv"},
           "torch": torch.__version__, "threads": args.threads}
    train_names, compile_names = _split(args.train_variants), set(_split(args.compile_variants))
    for kind in _split(args.models):
        if kind in skip:
            continue
        try:
            if "train" not in skip:
                res[f"{kind}_train"] = r = bench_train(kind, args, log, train_names, compile_names)
            else:
                build_variants(kind, args)  # raises Skipped where transform cannot take the model
        except Skipped as e:
            res[f"{kind}_train"] = {"skipped": str(e)}
            print(f"{TITLES[kind]}: skipped ({e})")
            continue
        if "train" not in skip:
            print(_fmt_table(f"{TITLES[kind]} train step (d={args.d}, {args.layers} layers, batch {args.batch}x{args.seq}, "
                             f"r={args.rank}); ratios to full fine-tuning and to PEFT, same mode", r))
        if not args.no_memory and kind in _split(args.memory_models):
            res[f"{kind}_memory"] = bench_memory(kind, args, _split(args.memory_variants), log)
            print(_fmt_memory(kind, res[f"{kind}_memory"]))
    if "conv" not in skip:
        cargs = copy.copy(args)
        cargs.batch = args.conv_batch
        res["conv_train"] = bench_train("conv", cargs, log, train_names, set(_split(args.conv_compile_variants)))
        print(_fmt_table(f"ConvNet train step ({args.conv_layers} conv {args.channels}ch, {args.image}px, "
                         f"batch {args.conv_batch}, r={args.rank})", res["conv_train"]))
    if "infer" not in skip:
        iargs = copy.copy(args)
        iargs.rounds = args.infer_rounds or args.rounds
        res["gpt_infer"] = bench_infer("gpt", iargs, log)
        for b, r in res["gpt_infer"].items():
            print(_fmt_table(f"GPT inference {b} (eval, no_grad); ratio to base", r, ("base",)))
    if "transform" not in skip:
        res["transform"] = bench_transform(args, log)
        print("transform() vs bare symbolic_trace (d=%d): " % args.trace_d + "; ".join(
            f"{n} layers {v['transform_s']:.3f}s / {v['symbolic_trace_s']:.3f}s = {v['ratio']:.2f}x "
            f"(shared weights {v['ratio_shared']:.2f}x, {v['transform_us_per_node']:.0f} us/node)"
            for n, v in res["transform"].items()))
    res["seconds"] = time.perf_counter() - t0
    print(f"total {res['seconds']:.0f} s")
    if args.json:
        write_results(args.json, res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
