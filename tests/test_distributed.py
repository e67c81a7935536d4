"""DDP and FSDP2 training of adapted models in 2 real gloo ranks on 127.0.0.1 (CASES.md 5 and 6).

One module-scoped fixture starts one process group of 2 ranks (forked, so the children share the
parent's imports) and runs every scenario of ``dist_scenarios.py`` in it; each test then checks
one scenario's results against an independent single-process reference: the *original* model
through ``torch.func.functional_call`` with ``W + s·(B @ A).reshape(W.shape)``, trained with the
same optimiser on the concatenated batch.  Where a process group cannot start, the tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_scenarios as ds
import lora_fx
from _tolerance import assert_close, assert_not_close
from _isolated import join_or_kill

WORLD = 2
# every scenario together takes ~5-15 s; a rank stuck on a dead peer never returns.  Below the
# per-test timeout (pyproject.toml), so the ranks are killed here, not the whole test worker.
RANKS_TIMEOUT_S = 120

# Tolerances.  The ranks and the single-process reference compute the same function in another
# summation order (per-rank means averaged by all-reduce vs one mean over the concatenated batch;
# FSDP's reduce-scatter), so each step-0 gradient differs by a few roundings of its largest term.
# Three SGD steps (lr 0.05, momentum 0.9) on O(0.1) factors carry those differences forward without
# amplifying them (the update is linear in the gradient and lr·|Hessian| << 1 here), so losses,
# gradients and final factors are held to the default fp32 tolerance of tests/_tolerance.py
# (256 ulps of the largest value, against ~a few ulps measured).


def _start_method() -> str:
    wanted = os.environ.get("LORA_FX_TEST_START_METHOD")
    if wanted:
        return wanted
    return "fork" if "fork" in mp.get_all_start_methods() else "spawn"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    # imported once here so forked ranks do not each import them (DDP and FSDP import torch._dynamo)
    import torch._dynamo  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    from torch.nn.parallel import DistributedDataParallel  # noqa: F401
    try:  # the Hugging Face scenario's model classes
        import transformers.models.llama.modeling_llama  # noqa: F401
    except ImportError:
        pass

    out = tmp_path_factory.mktemp("dist")
    try:
        port = ds.free_port()
    except OSError as exc:
        pytest.skip(f"cannot bind a port on 127.0.0.1: {exc}")
    ranks = mp.start_processes(ds.worker, args=(WORLD, port, str(out), list(ds.SCENARIOS)), nprocs=WORLD,
                               join=False, start_method=_start_method())
    join_or_kill(ranks, timeout=RANKS_TIMEOUT_S)
    failed = sorted(out.glob("init_failed_*.txt"))
    if failed:
        pytest.skip("gloo process group could not start: " + failed[0].read_text().strip().splitlines()[-1])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)] + [out]


@pytest.fixture(scope="module")
def reference():
    return ds.reference_training(WORLD)


def _scenario(results, name):
    per_rank = [r[name] for r in results[:WORLD]]
    for rank, res in enumerate(per_rank):
        assert "error" not in res, f"scenario {name!r} failed on rank {rank}:\n{res['error']}"
    return per_rank


def _assert_close_dicts(got, want, ulps=None, what=""):
    assert sorted(got) == sorted(want), what
    for k in want:
        assert_close(got[k], want[k], ulps=ulps, msg=f"{what} {k}")


def _trainable_keys():
    return sorted(ds.key(p, w) for p in ("proj.weight", "layers.0.fc1.weight", "layers.1.fc1.weight")
                  for w in ("lora_A", "lora_B"))


def test_reference_is_nontrivial(reference):
    # the single-process reference trains: loss falls, adapters move, the inactive adapter does not
    assert reference["losses"][-1] < reference["losses"][0]
    init = ds.initial_factors()
    a0, b0, _ = init["layers.0.fc1.weight"]
    assert_not_close(reference["lora"][ds.key("layers.0.fc1.weight", "lora_B")], b0)
    assert torch.equal(reference["lora"][ds.key(ds.INACTIVE, "lora_A")], init[ds.INACTIVE][0])


@pytest.mark.distributed
def test_ddp_three_steps_equal_single_process(results, reference):
    """CASES.md 5: three DDP steps with an inactive adapter equal the single-process reference."""
    per_rank = _scenario(results, "ddp")
    for res in per_rank:
        assert res["grads_equal"] == [True] * ds.STEPS  # A/B gradients identical across ranks, every step
        assert_close(res["losses"], reference["losses"])
        _assert_close_dicts(res["grads0"], reference["grads0"], what="ddp step-0 grad")
        _assert_close_dicts(res["lora"], reference["lora"], what="ddp final adapter")
        assert res["frozen_unchanged"]  # base weights bit-identical
    for k in per_rank[0]["lora"]:
        assert torch.equal(per_rank[0]["lora"][k], per_rank[1]["lora"][k])


@pytest.mark.distributed
def test_ddp_inactive_adapter_needs_no_find_unused_parameters(results):
    # CASES.md 5: a second, disabled adapter; find_unused_parameters=False; only the parameters of the
    # active forward require grad, so DDP's reducer expects exactly those gradients
    res = _scenario(results, "ddp")[0]
    assert sorted(n for n, rg in res["requires_grad"].items() if rg) == _trainable_keys()
    assert res["requires_grad"][ds.key(ds.INACTIVE, "lora_A")] is False
    assert res["n_captured_trainable"] == len(_trainable_keys())


@pytest.mark.distributed
def test_ddp_parameters_not_reregistered(results):
    for res in _scenario(results, "ddp"):
        assert res["identity"]


@pytest.mark.distributed
def test_fsdp2_per_block_three_steps_equal_single_process(results, reference):
    per_rank = _scenario(results, "fsdp")
    for res in per_rank:
        # per-block fully_shard hooks fired: each block module was called once per step
        assert res["block_calls"] == {"layers.0": ds.STEPS, "layers.1": ds.STEPS}
        assert res["all_dtensor"]
        assert_close(res["losses"], reference["losses"])
        _assert_close_dicts(res["grads0"], reference["grads0"], what="fsdp step-0 grad")
        _assert_close_dicts(res["lora"], reference["lora"], what="fsdp final adapter")


@pytest.mark.distributed
def test_flat_trace_breaks_per_block_fsdp_but_lora_fx_hierarchy_works(results):
    # why transform keeps blocks as called GraphModules: on a flat trace the same per-block
    # fully_shard fails, while the adapted model above trains (block hooks fired)
    for res in _scenario(results, "flat_trace"):
        assert res["flat_error"] is not None and "mixed torch.Tensor and DTensor" in res["flat_error"]


@pytest.mark.distributed
def test_fsdp2_mixed_trainability(results):
    # CASES.md 6: one adapted and one frozen Linear(100, 100) per block under FSDP2
    for res in _scenario(results, "fsdp"):
        assert res["trainable_names"] == _trainable_keys()
        assert res["grad_names"] == _trainable_keys()  # only adapters get gradients
        assert res["state_names"] == _trainable_keys()  # ... and optimizer state
        assert res["frozen_unchanged"]  # frozen weights unchanged bit for bit
        assert res["identity"]  # the parameters FSDP and the optimizer hold are the model's


@pytest.mark.distributed
def test_fsdp2_per_decoder_layer_of_a_hf_llama_equals_single_process(results):
    pytest.importorskip("transformers")
    want = ds.hf_reference()
    for res in _scenario(results, "fsdp_hf"):
        assert res["layers"] == ["model.layers.0", "model.layers.1"] and res["kept_class"]
        assert_close(res["losses"], want["losses"])
        _assert_close_dicts(res["grads0"], want["grads0"], what="step-0 gradients")
        _assert_close_dicts(res["lora"], want["lora"], what="trained adapters")
    _assert_close_dicts(_scenario(results, "fsdp_hf")[0]["folded"], want["folded"], what="folded weights")


@pytest.mark.distributed
def test_fsdp2_fold_gathered_equals_fold_unsharded(results, reference):
    res = _scenario(results, "fsdp")[0]
    ref = ds.adapted(ds.base_model())
    ref.load_state_dict(reference["lora"], strict=False)
    want = lora_fx.fold(ref).state_dict()
    _assert_close_dicts(res["folded"], want, what="folded")
    plain = ds.TinyNet()
    plain.load_state_dict(res["folded"], strict=True)
    x, _ = ds.batch(ds.STEPS)
    with torch.no_grad():
        expected = ds.reference_forward(ds.base_model(), reference["factors"], x)
        assert_close(plain(x), expected)


@pytest.mark.distributed
def test_fsdp2_bf16_mixed_precision(results, reference):
    # MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 shards, adapters and grads;
    # training follows the fp32 reference up to bf16 rounding of the forward
    init = {ds.key(n, w): t for n, (A, B, s) in ds.initial_factors().items() for w, t in (("lora_A", A), ("lora_B", B))}
    for res in _scenario(results, "fsdp_bf16"):
        assert res["param_dtypes"] == ["torch.float32"] and res["grad_dtypes"] == ["torch.float32"]
        assert res["losses"].dtype == torch.bfloat16
        # the forward runs on bf16 parameters and activations (a few bf16 roundings of the logits,
        # averaged by the mean) and the loss comes back rounded to bf16 (half an ulp): 2 ulps
        assert_close(res["losses"], reference["losses"], dtype=torch.bfloat16, ulps=2)
        assert res["grad_names"] == _trainable_keys() and res["frozen_unchanged"] and res["identity"]
        # each step's update is the fp32 one perturbed by those bf16 roundings (relative ~eps_bf16
        # per layer, 4 layers), so the factors' total movement may deviate by that fraction
        rel = 8 * torch.finfo(torch.bfloat16).eps
        for k in _trainable_keys():
            moved = (reference["lora"][k] - init[k]).norm()
            err = (res["lora"][k] - reference["lora"][k]).norm()
            assert moved > 0 and err < rel * moved, (k, float(err / moved))


@pytest.mark.distributed
def test_activation_checkpointing_same_gradients(results, reference):
    plain = _scenario(results, "fsdp")
    ac = _scenario(results, "fsdp_ac")
    for p, a in zip(plain, ac):
        # the checkpointed blocks ran twice per step (forward + recompute in backward)
        assert a["block_calls"] == {"layers.0": 2 * ds.STEPS, "layers.1": 2 * ds.STEPS}
        # recomputed forward: the same kernels on the same values (a fresh buffer may take another
        # BLAS blocking): a few roundings
        _assert_close_dicts(a["grads0"], p["grads0"], ulps=8, what="AC vs no AC grad")
        _assert_close_dicts(a["grads0"], reference["grads0"], what="AC grad vs reference")
        _assert_close_dicts(a["lora"], reference["lora"], what="AC final adapter")
        assert a["state_names"] == _trainable_keys() and a["frozen_unchanged"] and a["identity"]


def test_activation_checkpointing_single_process_exact():
    # no process group: checkpoint_blocks_ keeps state-dict keys and gives bit-identical gradients
    x, y = ds.batch(0)
    grads = []
    for ac in (False, True):
        gm = ds.adapted(ds.base_model())
        keys = list(gm.state_dict())
        if ac:
            lora_fx.distributed.checkpoint_blocks_(gm)
        assert list(gm.state_dict()) == keys
        ds.loss_fn(gm(x), y).backward()
        grads.append({n: p.grad for n, p in gm.named_parameters() if p.requires_grad})
    _assert_close_dicts(grads[1], grads[0], ulps=8, what="checkpointed grad")


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_fsdp2_adapter_only_checkpoint_reload(results, reference):
    per_rank = _scenario(results, "fsdp_checkpoint")
    out: Path = results[WORLD]
    for res in per_rank:
        assert res["fresh_differed"]  # the fresh model had other adapter values before loading
        assert res["dcp_reload_equal"]  # torch.distributed.checkpoint round trip: equal outputs
        assert res["full_reload_equal"]  # gathered full adapter state loaded into a sharded model
    assert [res["written"] for res in per_rank] == [True, False]  # only rank 0 writes the file
    # the adapter-only DCP checkpoint holds adapters only
    import torch.distributed.checkpoint as dcp
    meta = dcp.FileSystemReader(str(out / "dcp")).read_metadata()
    assert sorted(meta.state_dict_metadata) == sorted(reference["lora"])
    # full adapter state gathered on rank 0 -> safetensors -> fresh unsharded adapted model
    from lora_fx.io import load_lora_state
    fresh = ds.adapted(ds.base_model(), seed=99)
    load_lora_state(fresh, out / "adapter.safetensors")
    with torch.no_grad():
        for rank, res in enumerate(per_rank):
            assert_close(fresh(res["x"]), res["y_trained"])
    # the DCP checkpoint also loads without a process group into a fresh unsharded model
    target = lora_fx.lora_state_dict(ds.adapted(ds.base_model(), seed=99))
    dcp.load(target, checkpoint_id=str(out / "dcp"), no_dist=True)
    from safetensors.torch import load_file
    _assert_close_dicts(target, load_file(str(out / "adapter.safetensors")), ulps=0, what="dcp vs gathered")


def test_blocks_helper_errors():
    from torch import nn
    with pytest.raises(lora_fx.NotAdaptedError, match="lora_fx.transform"):
        lora_fx.distributed.blocks(nn.Linear(3, 3))
    gm = lora_fx.transform(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)), rank=2)
    with pytest.raises(lora_fx.ConfigError, match="blocks="):
        lora_fx.distributed.blocks(gm)
    names = [n for n, _ in lora_fx.distributed.blocks(ds.adapted(ds.base_model()))]
    assert names == ["layers.0", "layers.1"]


def test_save_gathered_and_load_full_without_process_group(tmp_path):
    # the same helpers work on a plain (unsharded) model: file format of lora_fx.io
    from lora_fx.io import load_lora_state
    gm = ds.adapted(ds.base_model())
    path = lora_fx.distributed.save_gathered_lora_state(gm, tmp_path / "a.safetensors")
    fresh = load_lora_state(ds.adapted(ds.base_model(), seed=3), path)
    x, _ = ds.batch(0)
    with torch.no_grad():
        assert torch.equal(fresh(x), gm(x))
    other = lora_fx.distributed.load_full_lora_state_dict_(ds.adapted(ds.base_model(), seed=4),
                                                            lora_fx.gather_lora_state_dict(gm))
    with torch.no_grad():
        assert torch.equal(other(x), gm(x))


def test_load_full_lora_state_dict_lists_every_mismatch():
    gm = ds.adapted(ds.base_model())
    sd = lora_fx.lora_state_dict(gm)
    before = {k: v.clone() for k, v in sd.items()}
    bad = dict(sd)
    bad["proj.lora.default.weight.lora_A"] = torch.zeros(3, 20)
    bad["nope.lora_A"] = torch.zeros(1)
    with pytest.raises(lora_fx.AdapterMismatchError) as err:
        lora_fx.distributed.load_full_lora_state_dict_(gm, bad)
    assert "nope.lora_A" in str(err.value) and "proj.lora.default.weight.lora_A" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in lora_fx.lora_state_dict(gm).items())  # nothing loaded


def test_blocks_nested_order():
    gm = ds.nested_adapted()
    assert [n for n, _ in lora_fx.distributed.blocks(gm)] == ["layers.0", "layers.1"]
    nested = [n for n, _ in lora_fx.distributed.blocks(gm, nested=True)]
    assert sorted(nested) == sorted(["layers.0", "layers.0.sub.0", "layers.0.sub.1", "layers.1", "layers.1.sub.0",
                                     "layers.1.sub.1"])
    for i, name in enumerate(nested):  # innermost first: no block comes after its parent
        assert not any(name.startswith(earlier + ".") for earlier in nested[:i])


@pytest.mark.distributed
def test_fsdp2_nested_blocks(results):
    gm = ds.nested_adapted()
    x, y = ds.batch(0, WORLD)
    loss = ds.loss_fn(gm(x), y)
    loss.backward()
    want = {n: p.grad for n, p in gm.named_parameters() if p.requires_grad}
    assert len(want) == 2 * (2 + 2 * 2)  # proj, head and 4 nested linears: A and B each
    for res in _scenario(results, "fsdp_nested"):
        assert_close(res["loss"], loss.detach())
        _assert_close_dicts(res["grads"], want, what="nested fsdp grad")
