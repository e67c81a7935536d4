"""Routing benchmark: a different adapter per sample in one batch (``lora_fx.route_adapters``), CPU.

Model: the GPT-2-style decoder of ``benchmarks/bench_train.py`` (LoRA on every block projection:
qkv, proj, fc, out), batch 32.  ``A`` adapters (default 8, rank 16 each), sample ``i`` routed to
adapter ``i mod A``.

Measured, side by side in one run (interleaved rotated rounds, per-round ratios; the method of
``bench_train.py``):
  * train step (forward, backward, AdamW step over the adapters in use): the routed step with ``A``
    adapters vs the step of the model with one adapter on the same batch (target ≤ 1.3×), for the lowering
    lora_fx picks and each one forced (``masked``: concatenated factors, ``gather``: gathered
    per-sample factors and batched matmuls);
  * inference (``eval``, ``no_grad``): the routed forward vs HF PEFT's mixed-adapter batch
    ``model(x, adapter_names=names)`` with the same factors (target ≤ its time); logits are checked
    equal first.

    python benchmarks/bench_route.py            # the documented figures (a few minutes, 1 thread)
    python benchmarks/bench_route.py --quick    # smoke run (used by tests)
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lora_fx  # noqa: E402
from benchmarks.results import write_results  # noqa: E402
import lora_fx.ops_route  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_train", os.path.join(HERE, "bench_train.py"))
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)

TARGETS = ["blocks.*.weight"]


def names_of(args) -> list[str]:
    return [f"a{i}" for i in range(args.adapters)]


def build_lora_fx(base, args, *, ratio=None, adapters=None):
    """The base model with ``adapters`` (default ``A``) adapters (random non-zero factors, all
    trainable), routed; ``ratio`` forces the routed lowering through
    :data:`lora_fx.ops_route.MASKED_MAX_RATIO`.  With one adapter: a plain adapted model."""
    names = names_of(args)[:adapters]
    gm = lora_fx.transform(base, rank=args.rank, targets=TARGETS, adapter_name=names[0])
    for n in names[1:]:
        lora_fx.add_adapter(gm, n, rank=args.rank, targets=TARGETS)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_B.copy_(torch.randn(s.lora_B.shape, generator=g) * 0.02)
            s.module.requires_grad_(True)
    if len(names) == 1:
        return gm
    saved = lora_fx.ops_route.MASKED_MAX_RATIO
    if ratio is not None:
        lora_fx.ops_route.MASKED_MAX_RATIO = ratio
    try:
        lora_fx.enable_routing_(gm)
    finally:
        lora_fx.ops_route.MASKED_MAX_RATIO = saved
    return gm


def build_peft(base, gm, args, adapters=None):
    """PEFT model with the same adapters and factor values as ``gm``."""
    import peft

    names = names_of(args)[:adapters]
    cfg = peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(bench_train.GPT_TARGETS))
    pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    ours = dict(gm.named_parameters())
    with torch.no_grad():
        for key, p in pm.named_parameters():
            if ".lora_" not in key:
                continue
            module, which, adapter = key[len("base_model.model."):].split(".lora_")[0], key.split(".lora_")[1][0], \
                key.split(".")[-2]
            p.copy_(ours[f"{module}.lora.{adapter}.weight.lora_{which}"])
    return pm.eval()


def train_fns(base, args):
    x, loss_fn = bench_train.make_inputs("gpt", args, args.batch)
    names = names_of(args)
    route = [names[i % len(names)] for i in range(args.batch)]
    fns = {}

    def step_of(gm, routing, params):
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            if routing is None:
                loss_fn(gm(x)).backward()
            else:
                with lora_fx.route_adapters(gm, routing):
                    loss_fn(gm(x)).backward()
            opt.step()

        return step

    one = build_lora_fx(base, args, adapters=1)  # the model with one adapter, not routed
    fns["one adapter"] = step_of(one, None, [p for p in one.parameters() if p.requires_grad])
    for label, ratio in ((f"{args.adapters} routed (auto)", None), (f"{args.adapters} routed (masked)", 1e9),
                         (f"{args.adapters} routed (gather)", 0.0)):
        gm = build_lora_fx(base, args, ratio=ratio)
        fns[label] = step_of(gm, route, [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)])
    return fns


def infer_fns(base, args):
    x, _ = bench_train.make_inputs("gpt", args, args.batch)
    names = names_of(args)
    route = [names[i % len(names)] for i in range(args.batch)]
    gm = build_lora_fx(base, args).eval()
    pm = build_peft(base, gm, args)
    with torch.no_grad():
        with lora_fx.route_adapters(gm, route):
            ours = gm(x)
        theirs = pm(x, adapter_names=route)
    err = float((ours - theirs).abs().max() / theirs.abs().max())
    assert err < 1e-4, f"routed logits differ from PEFT's mixed batch: {err:.2e}"

    def routed():
        with lora_fx.route_adapters(gm, route):
            gm(x)

    one = build_lora_fx(base, args, adapters=1).eval()
    pm_one = build_peft(base, one, args, adapters=1)
    return {"lora_fx routed": routed, "peft mixed": lambda: pm(x, adapter_names=route),
            "lora_fx one adapter": lambda: one(x), "peft one adapter": lambda: pm_one(x)}, err


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke run)")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.quick:
        for k, v in dict(d=32, heads=2, vocab=64, seq=8, batch=8, rank=4, adapters=3, rounds=2).items():
            if p.get_default(k) == getattr(args, k):
                setattr(args, k, v)
    return args


def _table(title, r, ref):
    lines = [title, f"  {'variant':<24}{'median ms':>11}{'ratio':>8}{'±':>7}{'best':>7}"]
    for name, v in r.items():
        ratio, spread = bench_train.paired_ratio(r, name, ref)
        best = min(v["rounds_ms"]) / min(r[ref]["rounds_ms"])
        v.update(ratio=ratio, ratio_spread=spread, ratio_best=best)
        lines.append(f"  {name:<24}{v['median_ms']:>11.2f}{ratio:>8.3f}{spread / 2:>7.3f}{best:>7.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="peft")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    base = bench_train.GPT(args.layers, args.d, args.heads, args.vocab, args.seq)
    res = {"config": vars(args), "torch": torch.__version__}
    fns = train_fns(base, args)
    for fn in fns.values():
        fn()
        fn()
    res["train"] = bench_train.run_rounds(fns, args.rounds, 1, args.clock)
    print(_table(f"train step, batch {args.batch}x{args.seq}, d={args.d}, {args.layers} layers, r={args.rank}; "
                 "ratio to one adapter", res["train"], "one adapter"), flush=True)
    fns, err = infer_fns(base, args)
    with torch.no_grad():
        for fn in fns.values():
            fn()
            fn()
        res["infer"] = bench_train.run_rounds(fns, args.rounds, 2, args.clock)
    res["infer_logits_rel_err"] = err
    print(_table(f"inference (eval, no_grad), {args.adapters} adapters in the batch; ratio to PEFT's mixed batch "
                 f"(logits equal: rel err {err:.1e})", res["infer"], "peft mixed"))
    res["seconds"] = time.perf_counter() - t0
    print(f"total {res['seconds']:.0f} s")
    if args.json:
        write_results(args.json, res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
