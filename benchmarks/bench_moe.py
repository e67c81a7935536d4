"""MoE benchmark: per-expert LoRA on the expert stacks of a Mixtral-style sparse MoE layer,
lora_fx vs HF PEFT ``target_parameters`` on the same targets (CPU).

The layer is transformers' ``MixtralSparseMoeBlock`` (router + experts, top-2) with a residual,
``E`` = 8 and 32 experts, LoRA rank 16 on ``experts.gate_up_proj`` and ``experts.down_proj``,
for transformers' default experts implementation (``grouped_mm``) and the ``eager`` loop.  PEFT
rebuilds each merged ``(E, out, in)`` stack on every forward; lora_fx computes each expert's update
factored (``x A[e]ᵀ B[e]ᵀ``) and never builds one.

Measured, side by side in one run (the method of ``benchmarks/bench_train.py``):
  * train step (forward, backward, AdamW step): variants interleaved in rotated rounds, per-round
    ratios lora_fx / PEFT (median, ± half their range, and the ratio of the fastest rounds);
  * peak training memory above the model: peak RSS of a fresh process during one train step minus
    its RSS after building (glibc told to mmap large blocks, the high-water mark reset).

    python benchmarks/bench_moe.py              # the documented figures (a few minutes, 1 thread)
    python benchmarks/bench_moe.py --quick      # smoke run (used by tests)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lora_fx  # noqa: E402
from benchmarks.results import write_results  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_train", os.path.join(HERE, "bench_train.py"))
bench_train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_train)

TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


class Layer(nn.Module):
    """``x + MixtralSparseMoeBlock(x)``."""

    def __init__(self, experts: int, impl: str, hidden: int, inter: int):
        super().__init__()
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts,
                            num_experts_per_tok=2)
        cfg._experts_implementation = impl
        self.mlp = MixtralSparseMoeBlock(cfg)

    def forward(self, x):
        return x + self.mlp(x)


def build(variant: str, experts: int, impl: str, args) -> tuple[nn.Module, list]:
    """``(model, trainable parameters)`` for ``"peft"``, ``"lora_fx"`` (torch.fx keeps the MoE block as
    a leaf), ``"lora_fx-kept"`` (the regions front-end: the layer keeps its classes, the kept
    ``MixtralExperts`` runs its class forward on the lazy stacks, as in a transformers model) or
    ``"frozen"`` (no adapter)."""
    torch.manual_seed(0)
    m = Layer(experts, impl, args.hidden, args.inter)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    if variant == "peft":
        import peft

        m = peft.get_peft_model(m, peft.LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=[],
                                                   target_parameters=[t.split(".", 1)[1] for t in TARGETS]))
    elif variant in ("lora_fx", "lora_fx-kept"):
        kw = {"frontend": "regions"} if variant == "lora_fx-kept" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", lora_fx.LoraFxWarning)  # the MoE block is kept as a leaf
            m = lora_fx.transform(m, rank=args.rank, targets=TARGETS, **kw)
        assert {s.lowering for s in lora_fx.sites(m)} == {"factored"}
    else:
        m.requires_grad_(False)
    params = [p for p in m.parameters() if p.requires_grad]
    return m, params


def inputs(args):
    g = torch.Generator().manual_seed(2)
    return torch.randn(args.batch, args.tokens // args.batch, args.hidden, generator=g, requires_grad=True)


def step_fn(model, params, x):
    opt = torch.optim.AdamW(params or [x], lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        opt.step()

    return step


_MEM_CHILD = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads({threads})
import importlib.util
spec = importlib.util.spec_from_file_location("bench_moe", {path!r})
b = importlib.util.module_from_spec(spec); spec.loader.exec_module(b)
args = b.parse_args({argv!r})
m, params = b.build({variant!r}, {experts}, {impl!r}, args)
x = b.inputs(args)
step = b.step_fn(m, params, x)
import gc; gc.collect()
from benchmarks.memory import reset_peak, rss
before, _ = rss()
reset_peak()  # the high-water mark from here
step()
_, peak = rss()
print(json.dumps({{"above_model_mib": (peak - before) / 2**20}}))
"""


def memory(variant: str, experts: int, impl: str, args) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", PYTHONHASHSEED="0")
    code = _MEM_CHILD.format(root=os.path.dirname(HERE), threads=args.threads, path=os.path.abspath(__file__),
                             argv=args.argv, variant=variant, experts=experts, impl=impl)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])["above_model_mib"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 rounds (smoke run)")
    p.add_argument("--experts", default="8,32")
    p.add_argument("--impls", default="grouped_mm,eager")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.argv = list(argv or [])
    if args.quick:
        for k, v in dict(experts="4", impls="grouped_mm", hidden=32, inter=48, tokens=64, rank=4, rounds=2).items():
            if p.get_default(k) == getattr(args, k):
                setattr(args, k, v)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="peft")
    res = {"config": {k: v for k, v in vars(args).items() if k != "argv"}, "torch": torch.__version__, "runs": {}}
    t0 = time.perf_counter()
    print(f"{'impl':<11}{'E':>4}{'PEFT ms':>10}{'lora_fx ms':>12}{'step ratio':>12}{'±':>7}{'best':>7}"
          f"{'PEFT MiB':>10}{'lora_fx MiB':>13}{'mem ratio':>11}")
    for impl in args.impls.split(","):
        for experts in (int(e) for e in args.experts.split(",")):
            x = inputs(args)
            fns = {v: step_fn(*build(v, experts, impl, args), x) for v in ("peft", "lora_fx", "lora_fx-kept", "frozen")}
            for fn in fns.values():  # warm-up (optimizer state)
                fn()
                fn()
            r = bench_train.run_rounds(fns, args.rounds, 1, args.clock)
            ratio, spread = bench_train.paired_ratio(r, "lora_fx", "peft")
            best = min(r["lora_fx"]["rounds_ms"]) / min(r["peft"]["rounds_ms"])
            kept, kept_spread = bench_train.paired_ratio(r, "lora_fx-kept", "peft")
            mem = {} if args.no_memory else {v: memory(v, experts, impl, args) for v in ("peft", "lora_fx", "lora_fx-kept")}
            run = {"step_ms": {k: v["median_ms"] for k, v in r.items()}, "step_ratio": ratio,
                   "step_ratio_spread": spread, "step_ratio_best": best, "memory_mib": mem,
                   "memory_ratio": mem["lora_fx"] / mem["peft"] if mem else None,
                   "kept_step_ratio": kept, "kept_step_ratio_spread": kept_spread,
                   "kept_memory_ratio": mem["lora_fx-kept"] / mem["peft"] if mem else None}
            res["runs"][f"{impl}/E{experts}"] = run
            print(f"{impl:<11}{experts:>4}{r['peft']['median_ms']:>10.1f}{r['lora_fx']['median_ms']:>12.1f}"
                  f"{ratio:>12.2f}{spread / 2:>7.2f}{best:>7.2f}"
                  + (f"{mem['peft']:>10.1f}{mem['lora_fx']:>13.1f}{run['memory_ratio']:>11.2f}" if mem else "")
                  + f"   kept classes: step {kept:.2f}" + (f", mem {run['kept_memory_ratio']:.2f}" if mem else ""),
                  flush=True)
    res["seconds"] = time.perf_counter() - t0
    print(f"(frozen base step for reference; ratios lora_fx / PEFT, per-round median; total {res['seconds']:.0f} s)")
    if args.json:
        write_results(args.json, res)
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
