"""QLoRA benchmark: a Hugging Face Llama with a quantized base against the same model in bf16, lora_fx
against PEFT, side by side (CPU).

Model: ``LlamaForCausalLM`` from a config (hidden 1024, 8 layers, intermediate 2816, 16 heads, 8 kv
heads, vocabulary 4096, untied head; random weights, saved once with ``save_pretrained`` and loaded
back the way users load a checkpoint), batch 1×128, LoRA rank 16, alpha 32 on all seven projections,
AdamW on the adapters.  Variants:

* ``lora_fx bf16``: ``lora_fx.transform`` of the bf16 model (the reference of every ratio);
* ``lora_fx torchao-nf4``: ``from_pretrained(..., quantization_config=TorchAoConfig(NF4WeightOnlyConfig()))``;
* ``lora_fx bnb-nf4``: ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization, bf16 compute)``;
* ``peft bnb-nf4``, ``peft bf16``: ``peft.get_peft_model`` on the same bases.

Sections (``--sections``, default all):

* ``bytes``: bytes of parameters and buffers of each adapted model (quantized weights counted by what
  they hold: packed data and statistics, :func:`lora_fx.weights.nbytes`), and of the decoder's base
  weights alone;
* ``memory``: one fresh process per variant (all import the same libraries).  After the model is built
  and the user's original dropped, freed heap is returned to the OS (``malloc_trim``, with
  ``MALLOC_MMAP_THRESHOLD_`` so that large blocks are mmapped) and the kernel's RSS high-water mark is
  reset (``/proc/self/clear_refs``); then training steps run.  Reported: the whole-process peak RSS
  (``VmHWM``), the same above the RSS right after the imports, and the *tensor-level* peak: the bytes
  of every tensor alive between steps (parameters, buffers, optimizer state) plus the peak of live
  allocations during one step from the profiler's allocator events;
* ``time``: train step (forward, backward, AdamW step) of every variant, interleaved in rounds whose
  order rotates, in one process; ``ratio`` is the median of the per-round ratios (CPU time of the
  process), ``±`` half their range;
* ``nf4``: torchao's ``NF4Tensor.get_original_weight()`` against lora_fx's NF4 dequantization on one
  2816×1024 bf16 weight: bitwise equality, time and transient peak.

    python benchmarks/bench_qlora.py --json benchmarks/results_qlora_cpu.json   # the docs figures
    python benchmarks/bench_qlora.py --quick                                    # smoke run (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import lora_fx  # noqa: E402
from benchmarks.results import write_results  # noqa: E402
from lora_fx import weights  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ["lora_fx bf16", "lora_fx torchao-nf4", "lora_fx bnb-nf4", "peft bnb-nf4", "peft bf16"]
FULL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=8, vocab_size=4096, seq=128, batch=1)
#: ``--size large``: a model whose weights dominate the process (1.5 GB in bf16 against ~0.45 GB of libraries).
LARGE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=4096, seq=128, batch=1)
QUICK = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=256, seq=16, batch=1)


@contextlib.contextmanager
def quiet():
    """The libraries' import-time and loading chatter (warnings, logs, progress bars) off stdout."""
    out, err = sys.stdout, sys.stderr
    sys.stdout = sys.stderr = io.StringIO()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout, sys.stderr = out, err
        logging.disable(logging.NOTSET)


with quiet():
    import transformers  # noqa: E402
    import peft  # noqa: E402
    import bitsandbytes  # noqa: E402,F401
    import torchao  # noqa: E402,F401
    from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig  # noqa: E402
transformers.logging.set_verbosity_error()
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def checkpoint(cfg: dict, root: str) -> str:
    """The random Llama of ``cfg`` saved in bf16 (built once per size)."""
    path = os.path.join(root, "llama_h{hidden_size}_l{num_hidden_layers}_v{vocab_size}".format(**cfg))
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        model_cfg = {k: v for k, v in cfg.items() if k not in ("seq", "batch")}
        config = transformers.LlamaConfig(**model_cfg, max_position_embeddings=2 * cfg["seq"], tie_word_embeddings=False,
                                          use_cache=False)
        with quiet():
            transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def build(variant: str, path: str):
    """``(model, optimizer)`` of a variant, in train mode, with non-zero ``lora_B`` (every path does work)."""
    library, base = variant.split()
    quant = {"torchao-nf4": transformers.TorchAoConfig(NF4WeightOnlyConfig()),
             "bnb-nf4": transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                        bnb_4bit_use_double_quant=True,
                                                        bnb_4bit_compute_dtype=torch.bfloat16)}.get(base)
    with quiet():
        model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu",
                                                                  dtype=torch.bfloat16)
    model.config.use_cache = False
    torch.manual_seed(0)
    if library == "peft":
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJ, lora_dropout=0.0))
    else:
        with quiet():
            adapted = lora_fx.transform(model, rank=16, alpha=32, targets=[f"*.{p}.weight" for p in PROJ])
        del model  # lora_fx adapts a copy; the user's original is dropped, as a training script would
    gc.collect()
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.normal_(0, 1e-3)
    adapted.train()
    params = [p for p in adapted.parameters() if p.requires_grad]
    return adapted, torch.optim.AdamW(params, lr=1e-4)


def batch(cfg: dict) -> torch.Tensor:
    return torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["seq"]), generator=torch.Generator().manual_seed(0))


def step(model, opt, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += weights.nbytes(t)
    return total


# ---------------------------------------------------------------------------------------------- bytes


def section_bytes(models: dict) -> dict:
    out = {}
    for v, (model, _) in models.items():
        base = [p for n, p in model.named_parameters() if ".layers." in n and "lora" not in n]
        out[v] = {"params_buffers_mib": tensor_bytes(list(model.parameters()) + list(model.buffers())) / 2**20,
                  "decoder_base_weights_mib": tensor_bytes(base) / 2**20,
                  "adapters_mib": tensor_bytes([p for p in model.parameters() if p.requires_grad]) / 2**20}
    ref = out["lora_fx bf16"]
    for r in out.values():
        r["ratio"] = r["params_buffers_mib"] / ref["params_buffers_mib"]
        r["decoder_ratio"] = r["decoder_base_weights_mib"] / ref["decoder_base_weights_mib"]
    return out


# ---------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def one_memory(variant: str, cfg: dict, path: str, steps: int) -> dict:
    """Run in a fresh process: the memory figures of one variant (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    rss_imports = _status_kib("VmRSS")
    model, opt = build(variant, path)
    ids = batch(cfg)
    step(model, opt, ids)  # optimizer state created, lazy pages touched
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    for _ in range(steps):
        step(model, opt, ids)
    hwm = _status_kib("VmHWM")
    state = tensor_bytes(list(model.parameters()) + list(model.buffers())
                         + [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)])
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(model, opt, ids)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return {"rss_peak_mib": hwm / 1024, "rss_above_imports_mib": (hwm - rss_imports) / 1024,
            "tensor_state_mib": state / 2**20, "tensor_step_peak_mib": peak / 2**20,
            "tensor_peak_mib": (state + peak) / 2**20}


def section_memory(cfg, path, steps: int, quick: bool, variants: list[str], size: str = "default") -> dict:
    out = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1")
    for v in variants:
        cmd = ([sys.executable, __file__, "--one-memory", v, "--memory-steps", str(steps), "--size", size]
               + (["--quick"] if quick else []))
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
        if res.returncode != 0 or not lines:
            raise RuntimeError(f"memory probe of {v!r} failed:\n{res.stderr[-3000:]}")
        out[v] = json.loads(lines[-1])
    ref = out["lora_fx bf16"]
    for r in out.values():
        for k in ("rss_peak_mib", "rss_above_imports_mib", "tensor_peak_mib"):
            r[k.replace("_mib", "_ratio")] = r[k] / ref[k]
    return out


# ---------------------------------------------------------------------------------------------- time


def section_time(cfg, models: dict, rounds: int) -> dict:
    ids = batch(cfg)
    for m, opt in models.values():  # warm-up: optimizer state, first-call caches
        step(m, opt, ids)
    names = list(models)
    cpu = {v: [] for v in names}
    wall = {v: [] for v in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for v in order:
            m, opt = models[v]
            c, w = time.process_time(), time.perf_counter()
            step(m, opt, ids)
            cpu[v].append(time.process_time() - c)
            wall[v].append(time.perf_counter() - w)
    out = {}
    for v in names:
        row = {"median_ms": 1e3 * statistics.median(cpu[v]), "wall_median_ms": 1e3 * statistics.median(wall[v])}
        for ref in ("lora_fx bf16", "peft bnb-nf4"):
            ratios = [a / b for a, b in zip(cpu[v], cpu[ref])]
            key = "vs_bf16" if ref == "lora_fx bf16" else "vs_peft_bnb"
            row[key] = statistics.median(ratios)
            row[key + "_pm"] = (max(ratios) - min(ratios)) / 2
        out[v] = row
    return out


# ---------------------------------------------------------------------------------------------- nf4


def section_nf4(quick: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile
    from torchao.quantization import to_nf4

    from lora_fx.weights.nf4 import dequantize_nf4

    shape = (256, 128) if quick else (2816, 1024)
    w = to_nf4(torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 0.02)

    def peak(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        live = top = 0
        for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                           if e.name() == "[memory]"):
            live += n
            top = max(top, live)
        return top

    def timed(fn, n=3 if quick else 20):
        fn()
        t = time.process_time()
        for _ in range(n):
            fn()
        return 1e3 * (time.process_time() - t) / n

    weight_bytes = w.numel() * 2
    return {"shape": list(shape), "bitwise_equal": bool(torch.equal(w.get_original_weight(), dequantize_nf4(w))),
            "torchao_ms": timed(w.get_original_weight), "lora_fx_ms": timed(lambda: dequantize_nf4(w)),
            "torchao_transient_x_weight": peak(w.get_original_weight) / weight_bytes,
            "lora_fx_transient_x_weight": peak(lambda: dequantize_nf4(w)) / weight_bytes}


# ---------------------------------------------------------------------------------------------- main


def _print(res: dict) -> None:
    if "bytes" in res:
        print("\nparameters + buffers (MiB)         total   × bf16   decoder base weights   × bf16")
        for v, r in res["bytes"].items():
            print(f"  {v:22s} {r['params_buffers_mib']:9.1f} {r['ratio']:8.3f} {r['decoder_base_weights_mib']:14.1f}"
                  f" {r['decoder_ratio']:14.3f}")
    if "memory" in res:
        print("\npeak training memory               tensors MiB  × bf16   RSS MiB  × bf16   RSS above imports  × bf16")
        for v, r in res["memory"].items():
            print(f"  {v:22s} {r['tensor_peak_mib']:14.1f} {r['tensor_peak_ratio']:7.3f} {r['rss_peak_mib']:9.0f}"
                  f" {r['rss_peak_ratio']:7.3f} {r['rss_above_imports_mib']:13.0f} {r['rss_above_imports_ratio']:11.3f}")
    if "time" in res:
        print("\ntrain step (CPU ms)                median   vs lora_fx bf16      vs PEFT bnb-nf4")
        for v, r in res["time"].items():
            print(f"  {v:22s} {r['median_ms']:9.0f} {r['vs_bf16']:10.3f} ±{r['vs_bf16_pm']:.2f}"
                  f" {r['vs_peft_bnb']:12.3f} ±{r['vs_peft_bnb_pm']:.2f}")
    if "nf4" in res:
        r = res["nf4"]
        print(f"\nNF4 dequantization {tuple(r['shape'])} bf16: bitwise equal {r['bitwise_equal']}; torchao "
              f"{r['torchao_ms']:.1f} ms, transient {r['torchao_transient_x_weight']:.1f}× the weight; lora_fx "
              f"{r['lora_fx_ms']:.1f} ms, {r['lora_fx_transient_x_weight']:.1f}×")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 round: tests the script, gives no figures")
    p.add_argument("--sections", default="bytes,memory,time,nf4")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated subset of the variants (must include 'lora_fx bf16' and 'peft bnb-nf4')")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--memory-steps", type=int, default=2)
    p.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lora_fx_bench_qlora"))
    p.add_argument("--json", default=None)
    p.add_argument("--size", choices=("default", "large"), default="default",
                   help="model size: default hidden 1024 x 8 layers; large hidden 2048 x 16 layers, intermediate 5632")
    p.add_argument("--one-memory", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else LARGE if args.size == "large" else FULL
    path = checkpoint(cfg, args.cache)
    if args.one_memory:  # the child process of the memory section
        print(json.dumps(one_memory(args.one_memory, cfg, path, args.memory_steps)))
        return {}
    torch.set_num_threads(1)
    sections = set(args.sections.split(","))
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    t0 = time.perf_counter()
    res = {"config": {**cfg, "rank": 16, "alpha": 32, "targets": PROJ, "quick": args.quick, "rounds": args.rounds,
                      "torch": torch.__version__, "torchao": torchao.__version__,
                      "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__,
                      "transformers": transformers.__version__}}
    if "memory" in sections:  # first: fresh processes, before this one holds five models
        res["memory"] = section_memory(cfg, path, args.memory_steps, args.quick, variants, args.size)
    if sections & {"bytes", "time"}:
        models = {v: build(v, path) for v in variants}
        if "bytes" in sections:
            res["bytes"] = section_bytes(models)
        if "time" in sections:
            res["time"] = section_time(cfg, models, 1 if args.quick else args.rounds)
        del models
    if "nf4" in sections:
        res["nf4"] = section_nf4(args.quick)
    res["config"]["seconds"] = round(time.perf_counter() - t0, 1)
    _print(res)
    if args.json:
        write_results(args.json, res)
    return res


if __name__ == "__main__":
    main()
