"""Scenarios run by tests/test_distributed.py in 2 real gloo ranks (spawned), and the
single-process references they are compared with.  Not a test module itself (no ``test_`` prefix),
importable by spawned children because pytest puts ``tests/`` on ``sys.path``.

Model: ``proj: Linear(20, 100)`` -> 2 blocks (``nn.ModuleList``) of ``LayerNorm(100)``,
``fc1: Linear(100, 100)`` (adapted) and ``fc2: Linear(100, 100)`` (frozen, not adapted: CASES.md 6)
with a residual -> ``head: Linear(100, 7)``.  Adapted: ``proj.weight`` (100, 20), ``layers.*.fc1.weight``
(100, 100), ``head.weight`` (7, 100); the ``head`` adapter is disabled (inactive: CASES.md 5).
"""

from __future__ import annotations

import gc
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import lora_fx
from _reference import lora_weight
from _tolerance import differs
from lora_fx.adapter import adapter_path

RANK, ALPHA = 4, 8.0
TARGETS = ["proj.weight", "layers.*.fc1.weight", "head.weight"]
INACTIVE = "head.weight"
STEPS, PER_RANK, SEQ, CLASSES = 3, 4, 5, 7
LR, MOMENTUM = 0.05, 0.9


class Block(nn.Module):
    def __init__(self, d: int = 100):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyNet(nn.Module):
    """``(N, SEQ, 20) -> (N, SEQ, 7)`` logits."""

    def __init__(self, n_blocks: int = 2):
        super().__init__()
        self.proj = nn.Linear(20, 100)
        self.layers = nn.ModuleList(Block() for _ in range(n_blocks))
        self.head = nn.Linear(100, CLASSES)

    def forward(self, x):
        h = self.proj(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(24, 24)

    def forward(self, x):
        return x + torch.tanh(self.lin(x))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = nn.ModuleList(Inner() for _ in range(2))

    def forward(self, x):
        for inner in self.sub:
            x = inner(x)
        return x


class NestedNet(nn.Module):
    """``layers[i]`` (blocks) each holding ``sub[j]`` (nested blocks): ``(N, SEQ, 20) -> (N, SEQ, 7)``."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(20, 24)
        self.layers = nn.ModuleList(Outer() for _ in range(2))
        self.head = nn.Linear(24, CLASSES)

    def forward(self, x):
        h = self.proj(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def nested_adapted() -> nn.Module:
    torch.manual_seed(4321)
    gm = lora_fx.transform(NestedNet(), rank=3, alpha=6.0)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_B.copy_(torch.randn(s.lora_B.shape, generator=g) * 0.2)
    return gm


def base_model() -> TinyNet:
    torch.manual_seed(1234)
    return TinyNet()


def adapted(base: nn.Module, *, seed: int = 7) -> nn.Module:
    """The adapted model with non-zero random A and B (seeded) and the head adapter disabled."""
    gm = lora_fx.transform(base, rank=RANK, alpha=ALPHA, targets=TARGETS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_A.copy_(torch.randn(s.lora_A.shape, generator=g) * 0.2)
            s.lora_B.copy_(torch.randn(s.lora_B.shape, generator=g) * 0.2)
            if s.param == INACTIVE:
                s.module.enabled = False
                s.module.refresh_scaling_()
    return lora_fx.mark_only_lora_as_trainable(gm)


def batch(step: int, world: int = 2):
    """The concatenated batch of ``step``: ``x (world·PER_RANK, SEQ, 20)``, ``y (world·PER_RANK, SEQ)``."""
    g = torch.Generator().manual_seed(100 + step)
    n = world * PER_RANK
    return torch.randn(n, SEQ, 20, generator=g), torch.randint(0, CLASSES, (n, SEQ), generator=g)


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * PER_RANK:(rank + 1) * PER_RANK]


def loss_fn(logits, y):
    return F.cross_entropy(logits.reshape(-1, CLASSES), y.reshape(-1))


def key(param: str, which: str) -> str:
    return f"{adapter_path(param, 'default')}.{which}"


# --------------------------------------------------------------------------------------------
# independent single-process reference: the original model through functional_call with
# W + s·(B @ A).reshape(W.shape), trained on the concatenated batch


def initial_factors() -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    gm = adapted(base_model())
    return {s.param: (s.lora_A.detach().clone(), s.lora_B.detach().clone(), s.scaling) for s in lora_fx.sites(gm)}


def reference_forward(base: nn.Module, factors, x):
    """The functional reference (tests/_reference.py) with factors that the reference's own
    optimizer trains: ``{name: (A, B, s)}``."""
    params = {n: lora_weight(W, *factors[n]) for n, W in base.named_parameters() if n in factors}
    return torch.func.functional_call(base, params, (x,))


def reference_training(world: int = 2) -> dict:
    """3 SGD steps (momentum) on the concatenated batches; returns per-step losses, the step-0
    gradients and the final factors, keyed like ``lora_state_dict``."""
    base = base_model()
    factors = {}
    for name, (A, B, s) in initial_factors().items():
        trainable = s != 0.0
        factors[name] = (A.clone().requires_grad_(trainable), B.clone().requires_grad_(trainable), s)
    params = [t for (A, B, s) in factors.values() if s != 0.0 for t in (A, B)]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    losses, grads0 = [], {}
    for step in range(STEPS):
        x, y = batch(step, world)
        loss = loss_fn(reference_forward(base, factors, x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            grads0 = {key(n, w): t.grad.clone() for n, (A, B, s) in factors.items() if s != 0.0
                      for w, t in (("lora_A", A), ("lora_B", B))}
        opt.step()
        losses.append(loss.detach())
    final = {key(n, w): t.detach().clone() for n, (A, B, s) in factors.items() for w, t in (("lora_A", A), ("lora_B", B))}
    return {"losses": torch.stack(losses), "grads0": grads0, "lora": final, "factors": factors}


# --------------------------------------------------------------------------------------------
# scenarios (run on every rank)


def _all_equal_across_ranks(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts[1:])


def _mean_loss(loss: torch.Tensor) -> torch.Tensor:
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def scenario_ddp(rank: int, world: int, outdir: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    gm = adapted(base_model())
    before = list(gm.parameters())
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    requires_grad = {n: p.requires_grad for n, p in gm.named_parameters()}
    ddp = DDP(gm, find_unused_parameters=False)
    captured = list(ddp._module_parameters)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    losses, grads_equal, grads0 = [], [], {}
    for step in range(STEPS):
        x, y = batch(step, world)
        loss = loss_fn(ddp(shard(x, rank)), shard(y, rank))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        named = {n: p for n, p in gm.named_parameters() if p.requires_grad}
        grads_equal.append(all(_all_equal_across_ranks(p.grad) for p in named.values()))
        if step == 0:
            grads0 = {n: p.grad.clone() for n, p in named.items()}
        opt.step()
        losses.append(_mean_loss(loss))
    after = list(gm.parameters())
    return {
        "losses": torch.stack(losses),
        "grads0": grads0,
        "grads_equal": grads_equal,
        "lora": lora_fx.distributed.gather_lora_state_dict(ddp),
        "frozen_unchanged": all(torch.equal(frozen[n], p) for n, p in gm.named_parameters() if n in frozen),
        "requires_grad": requires_grad,
        "identity": (len(before) == len(after) and all(a is b for a, b in zip(before, after))
                     and {id(p) for p in captured} <= {id(p) for p in after}
                     and all(p.grad is not None for p in captured if p.requires_grad)),
        "n_captured_trainable": sum(p.requires_grad for p in captured),
    }


def _fsdp_train(rank: int, world: int, *, ac: bool, **fsdp_kwargs) -> tuple[nn.Module, dict]:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    gm = adapted(base_model())
    frozen = {n: p.detach().clone() for n, p in gm.named_parameters() if not p.requires_grad}
    block_calls = {}
    for name, block in lora_fx.distributed.blocks(gm):
        block_calls[name] = 0
        block.register_forward_pre_hook(lambda m, a, name=name: block_calls.__setitem__(name, block_calls[name] + 1))
    if ac:
        lora_fx.distributed.checkpoint_blocks_(gm)
    lora_fx.distributed.fully_shard_blocks_(gm, **fsdp_kwargs)
    captured = dict(gm.named_parameters())
    fsdp_params = [fp.sharded_param for m in gm.modules() if isinstance(m, FSDPModule)
                   for fp in (m._get_fsdp_state()._fsdp_param_group.fsdp_params
                              if m._get_fsdp_state()._fsdp_param_group else [])]
    trainable = [p for p in gm.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=LR, momentum=MOMENTUM)
    losses, grads0 = [], {}
    for step in range(STEPS):
        x, y = batch(step, world)
        loss = loss_fn(gm(shard(x, rank)), shard(y, rank))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            grads0 = {n: p.grad.full_tensor() for n, p in gm.named_parameters() if p.requires_grad}
        opt.step()
        losses.append(_mean_loss(loss))
    names = {id(p): n for n, p in gm.named_parameters()}
    state_names = sorted(names[id(p)] for p in opt.state)
    out = {
        "losses": torch.stack(losses),
        "grads0": grads0,
        "lora": lora_fx.distributed.gather_lora_state_dict(gm),
        "block_calls": block_calls,
        "all_dtensor": all(isinstance(p, DTensor) for p in gm.parameters()),
        "grad_names": sorted(n for n, p in gm.named_parameters() if p.grad is not None),
        "state_names": state_names,
        "trainable_names": sorted(n for n, p in gm.named_parameters() if p.requires_grad),
        "frozen_unchanged": all(torch.equal(frozen[n], p.full_tensor()) for n, p in gm.named_parameters()
                                if n in frozen),
        "identity": (all(captured[n] is p for n, p in gm.named_parameters()) and len(captured) == len(list(gm.parameters()))
                     and len(fsdp_params) == len(captured)
                     and {id(p) for p in fsdp_params} == {id(p) for p in captured.values()}
                     and all(id(p) in {id(q) for q in captured.values()} for p in opt.state)),
    }
    return gm, out


def scenario_fsdp(rank: int, world: int, outdir: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gm, out = _fsdp_train(rank, world, ac=False)
    full = get_model_state_dict(gm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # fold the gathered model
        plain = adapted(base_model(), seed=99)
        plain.load_state_dict(full, strict=True)
        out["folded"] = {k: v.clone() for k, v in lora_fx.fold(plain).state_dict().items()}
    return out


def scenario_fsdp_ac(rank: int, world: int, outdir: Path) -> dict:
    gm, out = _fsdp_train(rank, world, ac=True)
    return out


def scenario_fsdp_bf16(rank: int, world: int, outdir: Path) -> dict:
    """FSDP2 mixed precision: bf16 compute (parameters all-gathered in bf16), fp32 gradient
    reduction; fp32 sharded parameters and adapters."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    gm, out = _fsdp_train(rank, world, ac=False,
                          mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    out["grad_dtypes"] = sorted({str(p.grad.dtype) for p in gm.parameters() if p.grad is not None})
    out["param_dtypes"] = sorted({str(p.dtype) for p in gm.parameters()})
    return out


def scenario_fsdp_nested(rank: int, world: int, outdir: Path) -> dict:
    """Nested blocks: fully_shard innermost first, then outer blocks, then the root; one step on
    the same full batch on every rank, so the averaged gradients equal one process's."""
    gm = nested_adapted()
    lora_fx.distributed.fully_shard_blocks_(gm)
    x, y = batch(0, world)
    loss = loss_fn(gm(x), y)
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.full_tensor() for n, p in gm.named_parameters() if p.requires_grad}}


def scenario_fsdp_checkpoint(rank: int, world: int, outdir: Path) -> dict:
    """Adapter-only checkpoints of a sharded model: (a) torch.distributed.checkpoint with the
    sharded adapter entries, reloaded into a fresh sharded model; (b) full state gathered on rank 0
    to a safetensors file (reloaded by the test in a fresh, unsharded model)."""
    import torch.distributed.checkpoint as dcp

    gm, out = _fsdp_train(rank, world, ac=False)
    x, _ = batch(STEPS, world)
    with torch.no_grad():
        y_trained = gm(shard(x, rank))
    sharded = lora_fx.lora_state_dict(gm)
    dcp.save(sharded, checkpoint_id=str(outdir / "dcp"))
    written = lora_fx.distributed.save_gathered_lora_state(gm, outdir / "adapter.safetensors")
    full = lora_fx.distributed.gather_lora_state_dict(gm)
    fresh = adapted(base_model(), seed=99)
    lora_fx.distributed.fully_shard_blocks_(fresh)
    with torch.no_grad():
        y_fresh_before = fresh(shard(x, rank))
    target = lora_fx.lora_state_dict(fresh)
    dcp.load(target, checkpoint_id=str(outdir / "dcp"))
    fresh.load_state_dict(target, strict=False)
    with torch.no_grad():
        y_fresh = fresh(shard(x, rank))
    # (c) full adapter state -> a fresh sharded model (each rank keeps its shard)
    fresh2 = adapted(base_model(), seed=98)
    lora_fx.distributed.fully_shard_blocks_(fresh2)
    lora_fx.distributed.load_full_lora_state_dict_(fresh2, full)
    with torch.no_grad():
        y_fresh2 = fresh2(shard(x, rank))
    return {"lora": out["lora"], "x": shard(x, rank), "y_trained": y_trained,
            "written": written is not None, "full_reload_equal": torch.equal(y_fresh2, y_trained),
            "dcp_reload_equal": torch.equal(y_fresh, y_trained),
            "fresh_differed": differs(y_fresh_before, y_trained)}


def scenario_flat_trace(rank: int, world: int, outdir: Path) -> dict:
    """Contrast: per-block fully_shard on a *flat* torch.fx trace, whose block forwards are
    inlined, so the blocks' FSDP hooks never fire and their weights stay sharded DTensors."""
    from torch import fx
    from torch.distributed.fsdp import fully_shard

    flat = fx.symbolic_trace(base_model())
    for i in range(2):
        fully_shard(flat.get_submodule(f"layers.{i}"))
    fully_shard(flat)
    x, _ = batch(0, world)
    try:
        flat(shard(x, rank))
    except Exception as exc:  # expected: mixed torch.Tensor and DTensor
        return {"flat_error": f"{type(exc).__name__}: {exc}"}
    return {"flat_error": None}


# --------------------------------------------------------------------------------------------
# a Hugging Face Llama that kept its class (the regions front-end), sharded per decoder layer

HF_STEPS, HF_SEQ = 2, 8


def _seeded_factors_(gm: nn.Module, seed: int) -> nn.Module:
    """Every site's ``lora_A`` / ``lora_B`` drawn from N(0, 0.2²) with one seeded generator, in site order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_A.copy_(torch.randn(s.lora_A.shape, generator=g) * 0.2)
            s.lora_B.copy_(torch.randn(s.lora_B.shape, generator=g) * 0.2)
    return gm


def hf_adapted(*, seed: int = 7) -> nn.Module:
    """Tiny LlamaForCausalLM, the seven projections adapted with non-zero seeded A and B."""
    from _hf import targets, tiny  # transformers only where this scenario runs

    gm = lora_fx.transform(tiny("llama"), rank=RANK, alpha=ALPHA, targets=targets("llama"))
    return _seeded_factors_(gm, seed).train()


def hf_batch(step: int, world: int = 2, vocab: int = 128) -> torch.Tensor:
    """Token ids ``(world·PER_RANK, HF_SEQ)`` of ``step`` (labels are the ids: causal LM loss)."""
    return torch.randint(3, vocab, (world * PER_RANK, HF_SEQ), generator=torch.Generator().manual_seed(200 + step))


def hf_training(gm: nn.Module, rank: int | None, world: int = 2, vocab: int = 128) -> dict:
    """``HF_STEPS`` SGD steps; ``rank`` None trains on the whole batch in one process."""
    opt = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=LR, momentum=MOMENTUM)
    losses, grads0 = [], {}
    for step in range(HF_STEPS):
        ids = hf_batch(step, world, vocab)
        ids = ids if rank is None else shard(ids, rank)
        loss = gm(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0:
            grads0 = {n: p.grad.full_tensor() if rank is not None else p.grad.clone()
                      for n, p in gm.named_parameters() if p.requires_grad}
        opt.step()
        losses.append(loss.detach() if rank is None else _mean_loss(loss))
    return {"losses": torch.stack(losses), "grads0": grads0}


def hf_reference() -> dict:
    """The same training in one process on the concatenated batches, and its folded weights."""
    gm = hf_adapted()
    out = hf_training(gm, None)
    out["lora"] = {k: v.detach().clone() for k, v in lora_fx.lora_state_dict(gm).items()}
    out["folded"] = {k: v.clone() for k, v in lora_fx.fold(gm).state_dict().items()}
    return out


def scenario_fsdp_hf(rank: int, world: int, outdir: Path) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    gm = hf_adapted()
    cls = type(gm)
    layers = [name for name, _ in lora_fx.distributed.blocks(gm)]
    lora_fx.distributed.fully_shard_blocks_(gm)
    out = hf_training(gm, rank, world)
    out["layers"] = layers
    out["kept_class"] = isinstance(gm, cls)
    out["lora"] = lora_fx.distributed.gather_lora_state_dict(gm)
    full = get_model_state_dict(gm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # fold the gathered model
        plain = hf_adapted(seed=99)
        plain.load_state_dict(full, strict=True)
        out["folded"] = {k: v.clone() for k, v in lora_fx.fold(plain).state_dict().items()}
    return out


# a tiny Mixtral with per-expert adapters on its expert stacks (kept MixtralExperts), per decoder layer

MOE_TARGETS = ["*.experts.gate_up_proj", "*.experts.down_proj", "*.q_proj.weight"]


def moe_adapted(*, seed: int = 7) -> nn.Module:
    """Tiny MixtralForCausalLM (4 experts), its expert stacks and q projections adapted with
    non-zero seeded factors."""
    from _moe import hf_moe_model  # transformers only where this scenario runs

    gm = lora_fx.transform(hf_moe_model("mixtral"), rank=RANK, alpha=ALPHA, targets=MOE_TARGETS)
    return _seeded_factors_(gm, seed).train()


def moe_reference() -> dict:
    """:func:`hf_training` of :func:`moe_adapted` in one process on the concatenated batches."""
    gm = moe_adapted()
    out = hf_training(gm, None, vocab=96)
    out["lora"] = {k: v.detach().clone() for k, v in lora_fx.lora_state_dict(gm).items()}
    return out


def scenario_fsdp_moe(rank: int, world: int, outdir: Path) -> dict:
    gm = moe_adapted()
    lora_fx.distributed.fully_shard_blocks_(gm)
    out = hf_training(gm, rank, world, vocab=96)
    out["lora"] = lora_fx.distributed.gather_lora_state_dict(gm)
    return out


SCENARIOS = {"fsdp_moe": scenario_fsdp_moe, "fsdp_hf": scenario_fsdp_hf, "flat_trace": scenario_flat_trace, "ddp": scenario_ddp, "fsdp": scenario_fsdp, "fsdp_ac": scenario_fsdp_ac, "fsdp_bf16": scenario_fsdp_bf16,
             "fsdp_nested": scenario_fsdp_nested,
             "fsdp_checkpoint": scenario_fsdp_checkpoint}


# --------------------------------------------------------------------------------------------
# process group plumbing (127.0.0.1 only)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, world: int, port: int, outdir: str, names: list[str]) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    outdir = Path(outdir)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=45))
    except Exception:
        (outdir / f"init_failed_{rank}.txt").write_text(traceback.format_exc())
        return
    results = {}
    try:
        for name in names:
            start = time.perf_counter()
            try:
                results[name] = SCENARIOS[name](rank, world, outdir)
                results[name]["seconds"] = time.perf_counter() - start
            except Exception:
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, outdir / f"rank{rank}.pt")
        gc.collect()  # DDP reducers and FSDP state die before the process group (else gloo can block)
        dist.destroy_process_group()
