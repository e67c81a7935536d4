"""Hugging Face benchmark: lora_fx on a transformers Llama that keeps its class (no example inputs)
vs PEFT and full fine-tuning, side by side in one run (CPU).

Sections (``--sections``, default all):

* ``transform``: ``lora_fx.transform`` of a deep Llama (``--transform-layers`` 24, hidden 256) vs
  PEFT's ``get_peft_model`` on a deep copy of the same model with the same targets (both include
  the copy: lora_fx never modifies the user's model);
* ``train``: one training step (forward with ``labels=``, backward, AdamW) of the Llama of the
  figures (hidden 256, 4 layers, vocab 4096, batch 8×256, r=16 on all seven projections), each
  variant's time and its ratio to full fine-tuning and to PEFT;
* ``memory``: peak memory of one training step above the model, each variant in a fresh process
  (glibc told to mmap every large block, so RSS tracks live memory; the high-water mark is reset
  after building the model and the batch), as ``benchmarks/bench_train.py`` measures it;
* ``saved``: bytes autograd saves for backward in one training forward, per variant (each storage
  once, parameters excluded);
* ``generate``: ``generate()`` of ``--new-tokens`` tokens (batch 1, KV cache, greedy): the base
  model, lora_fx unfolded (factored, and with the inference cache on) and folded, PEFT unmerged;
  ratios to the folded model and to PEFT, and the ratio of each variant's fastest round to the
  folded model's fastest; then each variant *head to head* with the folded model (only the two
  alternating, ``--pair-rounds`` rounds, so no third model's weights evict theirs from the CPU caches
  between them): the median of the paired ratios and its 95 % bootstrap interval.

Variants are rows of the ``TRAIN_VARIANTS`` / ``GENERATE_VARIANTS`` tables (name → factory of a
model from the base), so another one is one entry.  Every section times its variants interleaved
in rounds (each round times every variant once, in an order rotated per round: drifts of a shared
machine hit all alike) and reports the median of the per-round ratios with ``±`` half their range.

    python benchmarks/bench_hf.py                 # the docs' figures (about 5 min on 1 core)
    python benchmarks/bench_hf.py --quick         # smoke run (used by the tests)
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import lora_fx  # noqa: E402
from benchmarks.results import write_results  # noqa: E402
from benchmarks.bench_train import CLOCK, paired_ratio, run_rounds  # noqa: E402
from benchmarks.stats import paired  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama(args, layers: int) -> torch.nn.Module:
    """A ``LlamaForCausalLM`` from its config (random weights, default ``use_cache=True``)."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                   num_hidden_layers=layers, num_attention_heads=args.heads,
                                   num_key_value_heads=args.heads, vocab_size=args.vocab,
                                   max_position_embeddings=max(args.seq, 64) + args.new_tokens,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(cfg)


def _lora_fx(base, args):
    return lora_fx.transform(base, rank=args.rank, alpha=args.rank, targets=[f"*.{p}.weight" for p in PROJECTIONS])


def _peft(base, args):
    import peft

    cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0, target_modules=PROJECTIONS)
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def _full(base, args):
    return copy.deepcopy(base).requires_grad_(True)


def _lora_fx_keep(base, args):
    """lora_fx keeping every adapter input, as PEFT does (``recompute_inputs=False``)."""
    return lora_fx.transform(base, rank=args.rank, alpha=args.rank, targets=[f"*.{p}.weight" for p in PROJECTIONS],
                             recompute_inputs=False)


#: name → ``factory(base, args)`` of a model to train (all from the same base weights).
TRAIN_VARIANTS: dict[str, Callable] = {"full": _full, "peft": _peft, "lora_fx": _lora_fx,
                                       "lora_fx-keep-inputs": _lora_fx_keep}
#: name → ``factory(base, args)`` of a model to generate with (the adapted ones share one set of
#: adapter values: lora_fx's, folded, and copied into PEFT's layers).
GENERATE_VARIANTS: dict[str, Callable] = {
    "base": lambda base, args: copy.deepcopy(base),
    "lora_fx-folded": lambda base, args: lora_fx.fold(_adapted(base, args)),
    "lora_fx": lambda base, args: _adapted(base, args),
    "lora_fx+cache": lambda base, args: lora_fx.inference_cache_(copy.deepcopy(_adapted(base, args))),
    "peft": lambda base, args: _peft_with(_adapted(base, args), base, args),
}
_ADAPTED: dict[int, torch.nn.Module] = {}


def _adapted(base, args):
    """One adapted copy of ``base`` per run, with small non-zero B (so the adapters change the tokens)."""
    if id(base) not in _ADAPTED:
        gm = _lora_fx(base, args)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for s in lora_fx.sites(gm):
                s.lora_B.copy_(torch.randn(s.lora_B.shape, generator=g) * 0.05)
        _ADAPTED[id(base)] = gm
    return _ADAPTED[id(base)]


def _peft_with(gm, base, args):
    """PEFT's model of ``base`` holding ``gm``'s adapter values."""
    pm = _peft(base, args)
    ours = {s.param: s for s in lora_fx.sites(gm)}
    with torch.no_grad():
        for name, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                s = ours[name.removeprefix("base_model.model.") + ".weight"]
                mod.lora_A["default"].weight.copy_(s.lora_A)
                mod.lora_B["default"].weight.copy_(s.lora_B)
    return pm


def batch(args) -> torch.Tensor:
    return torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))


def train_step_fn(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()

    return step


def _ratios(res: dict, refs: tuple[str, ...]) -> None:
    """Each variant's median per-round ratio (and its spread) to each of ``refs``."""
    for name, r in res.items():
        for ref in refs:
            if ref in res:
                r[f"ratio_to_{ref}"], r[f"spread_to_{ref}"] = paired_ratio(res, name, ref)


# ---------------------------------------------------------------------------------------------
# sections


def bench_transform(args, log) -> dict:
    model = llama(args, args.transform_layers)
    _lora_fx(llama(args, 1), args), _peft(llama(args, 1), args)  # first-call costs (imports, tracer set-up)
    times = {"lora_fx": [], "peft": []}
    clock = CLOCK[args.clock]
    for i in range(args.transform_rounds):
        for name in (("lora_fx", "peft") if i % 2 == 0 else ("peft", "lora_fx")):
            gc.collect()
            t = clock()
            out = TRAIN_VARIANTS[name](model, args)
            times[name].append(clock() - t)
            del out
    ratios = [a / b for a, b in zip(times["lora_fx"], times["peft"])]
    res = {name: {"median_s": statistics.median(v), "rounds_s": v} for name, v in times.items()}
    res["ratio"] = statistics.median(ratios)
    res["ratio_spread"] = max(ratios) - min(ratios)
    res["layers"] = args.transform_layers
    log(f"  transform {args.transform_layers}-layer Llama: lora_fx {res['lora_fx']['median_s']:.3f} s, "
        f"PEFT {res['peft']['median_s']:.3f} s ({res['ratio']:.2f}x)")
    return res


def bench_train(args, log) -> dict:
    base = llama(args, args.layers)
    ids = batch(args)
    fns = {name: train_step_fn(make(base, args), ids) for name, make in TRAIN_VARIANTS.items()}
    for name, fn in fns.items():  # warm-up: optimizer state (not timed)
        fn()
        log(f"  warm-up {name} done")
    res = run_rounds(fns, args.rounds, args.steps, args.clock)
    _ratios(res, ("full", "peft"))
    return res


_MEM_CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
import benchmarks.bench_hf as b
args = b.parse_args({argv!r})
from benchmarks.memory import reset_peak, rss
base = b.llama(args, args.layers)
model = b.TRAIN_VARIANTS[{name!r}](base, args)
ids = b.batch(args)
del base
import gc; gc.collect()
step = b.train_step_fn(model, ids)
before, _ = rss()
reset_peak()  # the high-water mark from here
for _ in range({steps}):
    step()
_, peak = rss()
print(json.dumps({{"above_model_mib": (peak - before) / 2**20}}))
"""


def bench_memory(args, log) -> dict:
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONHASHSEED="0")
    for name in args.memory_variants.split(","):
        code = _MEM_CHILD.format(root=ROOT, threads=args.threads, argv=args.argv, name=name, steps=args.memory_steps)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode != 0:
            out[name] = {"error": proc.stderr.strip().splitlines()[-1:]}
            continue
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        log(f"  memory {name}: {out[name]['above_model_mib']:.0f} MiB")
    for name, r in out.items():
        for ref in ("full", "peft"):
            if "above_model_mib" in r and "above_model_mib" in out.get(ref, {}):
                r[f"ratio_to_{ref}"] = r["above_model_mib"] / out[ref]["above_model_mib"]
    return out


def bench_saved(args, log) -> dict:
    """Bytes autograd saves for backward in one training forward (``saved_tensors_hooks``; each
    storage once), per variant: the activations a step keeps, without the allocator's view."""
    base = llama(args, args.layers)
    ids = batch(args)
    out = {}
    for name, make in TRAIN_VARIANTS.items():
        model = make(base, args).train()
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids).loss
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        out[name] = {"saved_mib": sum(v for k, v in seen.items() if k not in params) / 2**20}
        log(f"  saved for backward {name}: {out[name]['saved_mib']:.1f} MiB")
        del model
    for name, r in out.items():
        for ref in ("full", "peft"):
            r[f"ratio_to_{ref}"] = r["saved_mib"] / out[ref]["saved_mib"]
    return out


def bench_generate(args, log) -> dict:
    base = llama(args, args.layers).eval()
    models = {name: make(base, args).eval() for name, make in GENERATE_VARIANTS.items()}
    prompt = torch.randint(3, args.vocab, (1, 16), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    fns = {name: (lambda m=m: m.generate(input_ids=prompt, **kw)) for name, m in models.items()}
    with torch.no_grad():
        tokens = {name: fn() for name, fn in fns.items()}  # warm-up, and the tokens each gives
        res = run_rounds(fns, args.rounds, 1, args.clock)
    _ratios(res, ("lora_fx-folded", "peft"))
    ref = min(res["lora_fx-folded"]["rounds_ms"])
    for name, r in res.items():  # least-disturbed run of each: steadier than medians on a shared machine
        r["best_ratio_to_lora_fx-folded"] = min(r["rounds_ms"]) / ref
    res["same_tokens_as_folded"] = {n: bool(torch.equal(t, tokens["lora_fx-folded"])) for n, t in tokens.items()}
    pairs = {}
    with torch.no_grad():
        for name in (n for n in fns if n not in ("base", "lora_fx-folded")):
            two = run_rounds({"lora_fx-folded": fns["lora_fx-folded"], name: fns[name]}, args.pair_rounds, 1, args.clock)
            pairs[name] = paired(two, name, "lora_fx-folded")
            log(f"  head to head {name} / folded: {pairs[name]['ratio']:.3f} {pairs[name]['ci95']}")
    res["head_to_head_with_folded"] = pairs
    return res


SECTIONS = {"transform": bench_transform, "train": bench_train, "memory": bench_memory, "saved": bench_saved,
            "generate": bench_generate}


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (a smoke run)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688, help="8/3 · hidden, rounded")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--transform-layers", type=int, default=24)
    p.add_argument("--transform-rounds", type=int, default=9)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--pair-rounds", type=int, default=31, help="rounds of each head-to-head generate comparison")
    p.add_argument("--steps", type=int, default=2, help="train steps per timing")
    p.add_argument("--memory-steps", type=int, default=1)
    p.add_argument("--memory-variants", default=",".join(TRAIN_VARIANTS), help="variants measured in a fresh process")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.argv = list(argv or [])
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.vocab, args.batch, args.seq = 32, 48, 2, 128, 2, 16
        args.transform_layers, args.transform_rounds, args.rounds, args.steps, args.new_tokens = 4, 2, 2, 1, 4
        args.pair_rounds = 2
    return args


def _fmt_ratio(r: dict, ref: str) -> str:
    key = f"ratio_to_{ref}"
    if key not in r:
        return ""
    spread = r.get(f"spread_to_{ref}")
    return f"{r[key]:.3f}" + (f" ±{spread / 2:.3f}" if spread is not None else "")


def report(res: dict) -> None:
    if "transform" in res:
        t = res["transform"]
        print(f"\ntransform() of a {t['layers']}-layer Llama, no example inputs, vs PEFT get_peft_model "
              f"(both with a deep copy): lora_fx {t['lora_fx']['median_s']:.3f} s, PEFT {t['peft']['median_s']:.3f} s, "
              f"ratio {t['ratio']:.2f} ±{t['ratio_spread'] / 2:.2f}")
    for section, refs, unit in (("train", ("full", "peft"), "ms"), ("generate", ("lora_fx-folded", "peft"), "ms")):
        if section not in res:
            continue
        print(f"\n{section} ({'per step' if section == 'train' else 'per generate() call'}, median of rounds)")
        print(f"  {'variant':16} {'median ' + unit:>12} " + " ".join(f"{'/ ' + r:>18}" for r in refs))
        for name, r in res[section].items():
            if isinstance(r, dict) and "median_ms" in r:
                best = r.get("best_ratio_to_lora_fx-folded")
                print(f"  {name:16} {r['median_ms']:12.1f} " + " ".join(f"{_fmt_ratio(r, ref):>18}" for ref in refs)
                      + (f"   best/best folded {best:.3f}" if best is not None else ""))
        if section == "generate" and res[section].get("head_to_head_with_folded"):
            print("  head to head with the folded model (two models alternating; median paired ratio, 95 % interval)")
            for name, p in res[section]["head_to_head_with_folded"].items():
                print(f"  {name:16} {p['ratio']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]")
    if "saved" in res:
        print("\nbytes saved for backward by one training forward (parameters excluded)")
        for name, r in res["saved"].items():
            print(f"  {name:20} {r['saved_mib']:8.1f} MiB  / full {r['ratio_to_full']:.3f}  / peft {r['ratio_to_peft']:.3f}")
    if "memory" in res:
        print("\npeak memory of one training step above the model")
        for name, r in res["memory"].items():
            if "above_model_mib" in r:
                print(f"  {name:20} {r['above_model_mib']:8.1f} MiB  / full {r.get('ratio_to_full', 0):.3f}  "
                      f"/ peft {r.get('ratio_to_peft', 0):.3f}")
            else:
                print(f"  {name:20} error: {r['error']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    res = {"config": {k: v for k, v in vars(args).items() if k != "argv"}}
    for name in args.sections.split(","):
        start = time.perf_counter()
        res[name] = SECTIONS[name](args, log)
        log(f"[{name}] {time.perf_counter() - start:.0f} s")
    report(res)
    if args.json:
        write_results(args.json, res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
