"""Sites on quantized weights (torchao tensor subclasses, bitsandbytes linears): exact against the
functional reference on the library's own dequantized weights (``_quantized.float_twin``), outputs
and every ``lora_A`` / ``lora_B`` / input gradient, fp32 and bf16, factored and merge, train and
eval; nothing weight-sized saved for backward; the kinds that are not weight-only (dynamic
activations: straight-through; int4 CPU: inference only) say so."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import lora_fx
from lora_fx import ops, weights
from lora_fx.ops_quantized import quantized_linear

from _quantized import KINDS, WEIGHT_ONLY, D_IN, float_twin, kind, quiet_import, saved_float_bytes
from _reference import check_matches_reference, leaf_factors, randomize_, reference_call
from _tolerance import assert_close


def _x(dtype, seed=3):
    return torch.randn(4, 5, D_IN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _adapted(name, dtype, **kw):
    model = kind(name).build(dtype)
    twin = float_twin(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lora_fx.LoraFxWarning)  # merge lowering says it dequantizes
        gm = lora_fx.transform(model, rank=4, alpha=8, **kw)
    randomize_(gm, scale=0.1)
    return model, twin, gm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_factored_exact_against_the_dequantized_reference(name, dtype):
    model, twin, gm = _adapted(name, dtype)
    assert [(s.param, s.op, s.lowering, s.shape) for s in lora_fx.sites(gm)] == [
        ("0.weight", "linear", "factored", (256, 128)), ("2.weight", "linear", "factored", (128, 256))]
    assert all(s.lora_A.dtype == torch.float32 for s in lora_fx.sites(gm))  # never the storage dtype (uint8)
    check_matches_reference(twin, gm, (_x(dtype),), dtype=dtype)
    gm.eval()
    if name != "bnb-int8":  # bitsandbytes' int8 inference kernel quantizes its input (see test_eval_int8)
        check_matches_reference(twin, gm, (_x(dtype, 4),), dtype=dtype)
    assert type(model[0].weight).__name__ not in ("Parameter", "Tensor")  # the user's model keeps its weights


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_merge_dequantizes_exactly_and_warns(name):
    model = kind(name).build(torch.bfloat16)
    twin = float_twin(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = lora_fx.transform(model, rank=4, alpha=8, lowering="merge")
    said = [str(w.message) for w in caught if issubclass(w.category, lora_fx.LoraFxWarning)]
    assert len(said) == 2 and re.match(r"'0\.weight' is a (torchao|bnb)-[\w-]+ weight used by linear, which is "
                                       r"lowered by merging.*\(256, 128\) copy \(0\.\d\d MiB\)", said[0]), said
    assert {s.lowering for s in lora_fx.sites(gm)} == {"merge"}
    assert ops.dequantized in [n.target for n in gm.graph.nodes]
    randomize_(gm, scale=0.1)
    check_matches_reference(twin, gm, (_x(torch.bfloat16),), dtype=torch.bfloat16)


def test_eval_int8_quantizes_activations_train_is_exact():
    # bitsandbytes' Linear8bitLt computes x·Wᵀ in int8 in eval mode (LLM.int8 inference): about 1 % off
    model, twin, gm = _adapted("bnb-int8", torch.float32)
    x = _x(torch.float32)
    check_matches_reference(twin, gm, (x,))
    gm.eval()
    with torch.no_grad():
        got, ref = gm(x), reference_call(twin, gm, (x,))
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 0.05


@pytest.mark.parametrize("name", ["torchao-nf4", "torchao-int8", "torchao-intx-int4", "torchao-float8", "bnb-nf4-dq"])
def test_no_weight_sized_float_copy_saved_for_backward(name):
    model, _, gm = _adapted(name, torch.bfloat16)
    weight_bytes = 256 * 128 * 2
    x = _x(torch.bfloat16).requires_grad_(True)
    out = []
    found = saved_float_bytes(lambda: out.append(gm(x)), weight_bytes // 2)
    assert found == [], found
    out[0].float().sum().backward()
    if name.startswith("torchao"):  # routed: the frozen-base op, which saves only the quantized parameter
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"].count(quantized_linear) == 2


def test_stock_torchao_int8_would_save_a_weight_sized_copy():
    # the reason for routing: torchao's own linear backward on an int8 weight keeps a float copy of it
    model = kind("torchao-int8").build(torch.bfloat16)
    x = _x(torch.bfloat16).requires_grad_(True)
    found = saved_float_bytes(lambda: model(x), 256 * 128 * 2 // 2)
    assert any(shape in ((128, 256), (256, 128)) for _, shape, _ in found), found


def test_straight_through_kinds_warn_once_and_pass_a_gradient():
    quiet_import("torchao")
    model = kind("torchao-int8-dynamic").build(torch.float32)
    twin = float_twin(model)
    with pytest.warns(lora_fx.LoraFxWarning, match=r"2 linear layer\(s\) quantize their input.*straight-through"):
        gm = lora_fx.transform(model, rank=4, alpha=8)
    randomize_(gm, scale=0.1)
    x = _x(torch.float32).requires_grad_(True)
    y = gm(x)
    ref_x = x.detach().clone().requires_grad_(True)
    leaves = leaf_factors(gm)
    ref = reference_call(twin, gm, (ref_x,), factors=leaves)
    assert ((y - ref).abs().max() / ref.abs().max()) < 0.05  # the activation rounding, nothing more
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
    y.backward(g)
    ref.backward(g)
    assert x.grad is not None  # torchao's own kernel gives none (an adapter before it would not train)
    site = {s.param: s for s in lora_fx.sites(gm)}["0.weight"]  # its gradient crosses layer 2's base
    a_ref = leaves[("0.weight", "default")][0].grad
    assert ((site.lora_A.grad - a_ref).norm() / a_ref.norm()) < 0.05


def test_int4_cpu_serves_inference_and_names_the_layer_it_cannot_train_through():
    quiet_import("torchao")
    model = kind("torchao-int4-cpu").build(torch.bfloat16)
    twin = float_twin(model)
    gm = lora_fx.transform(model, rank=4, alpha=8)
    randomize_(gm, scale=0.1)
    x = _x(torch.bfloat16)
    with torch.no_grad():
        assert_close(gm(x), reference_call(twin, gm, (x,)), dtype=torch.bfloat16)
    with pytest.raises(lora_fx.UnsupportedSiteError, match=r"'2\.weight' holds a torchao-int4-cpu weight.*no backward"):
        gm(x).float().sum().backward()  # layer 1's adapter needs layer 2's input gradient
    last = lora_fx.transform(model, rank=4, targets=["2.weight"])  # nothing before layer 2 trains: fine
    last(x).float().sum().backward()
    assert lora_fx.sites(last)[0].lora_B.grad is not None


def test_nf4_embedding_is_merged_with_a_warning():
    quiet_import("torchao")
    from torchao.quantization import to_nf4

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(256, 64), nn.Linear(64, 256)).to(torch.bfloat16)
    model[0].weight = nn.Parameter(to_nf4(model[0].weight.detach()), requires_grad=False)
    twin = nn.Sequential(nn.Embedding(256, 64), nn.Linear(64, 256)).to(torch.bfloat16)
    twin.load_state_dict({"0.weight": model[0].weight.get_original_weight(), **{
        k: v for k, v in model.state_dict().items() if k.startswith("1.")}})
    with pytest.warns(lora_fx.LoraFxWarning, match=r"'0\.weight' is a torchao-nf4 weight used by embedding"):
        gm = lora_fx.transform(model, rank=4, targets=["0.weight"])
    assert lora_fx.sites(gm)[0].lowering == "merge"  # torchao's NF4 has no embedding kernel
    randomize_(gm, scale=0.1)
    idx = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    check_matches_reference(twin, gm, (idx,), dtype=torch.bfloat16, grad_input=False)


def test_int8_embedding_is_factored_on_its_own_kernel():
    quiet_import("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(256, 64))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, n: isinstance(m, nn.Embedding))
    twin = nn.Sequential(nn.Embedding(256, 64))
    twin[0].weight = nn.Parameter(model[0].weight.dequantize(), requires_grad=False)
    gm = lora_fx.transform(model, rank=4)
    assert lora_fx.sites(gm)[0].lowering == "factored"
    randomize_(gm, scale=0.1)
    idx = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    check_matches_reference(twin, gm, (idx,), grad_input=False)


def test_lora_fx_never_imports_the_quantization_libraries_itself():
    # only the backend files import torchao / bitsandbytes, and nothing imports those files: they are
    # loaded by lora_fx.weights / lora_fx.rules the first time a tensor or module of the library is seen
    import ast
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    backends = {"lora_fx/weights/torchao.py", "lora_fx/weights/bnb.py", "lora_fx/rules/bnb.py"}
    importers, importing_backends = set(), set()
    for folder in ("lora_fx", "passes"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                rel = os.path.relpath(os.path.join(dirpath, f), root)
                for node in ast.walk(ast.parse(open(os.path.join(root, rel)).read())):
                    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                             [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                             if isinstance(node, ast.ImportFrom) else [])
                    if any(n.split(".")[0] in ("torchao", "bitsandbytes") for n in names):
                        importers.add(rel)
                    if rel not in backends and (any(n.endswith(("weights.torchao", "weights.bnb", "rules.bnb"))
                                                    for n in names) or (isinstance(node, ast.ImportFrom) and node.level
                                                                        and node.module in ("torchao", "bnb"))):
                        importing_backends.add(rel)
    assert importers == backends
    assert importing_backends == set()  # (a backend may import its library's other backend file)
    assert weights.BACKENDS == {"torchao": "lora_fx.weights.torchao", "bitsandbytes": "lora_fx.weights.bnb"}


def test_kinds_report_logical_shape_dtype_and_bytes():
    quiet_import("torchao")
    quiet_import("bitsandbytes")
    for name in ("torchao-nf4", "bnb-nf4-dq", "bnb-int8", "torchao-int8"):
        model = kind(name).build(torch.bfloat16)
        w = model[0].weight
        assert weights.logical_shape(w) == (256, 128), name
        assert weights.compute_dtype(w) == (torch.float16 if name == "bnb-int8" else torch.bfloat16), name
        assert weights.reason(w) is None and not weights.writable(w) and not weights.is_plain(w)
        assert weights.nbytes(w) < 0.6 * 256 * 128 * 2, (name, weights.nbytes(w))  # int8 ≈ 0.5, 4-bit ≈ 0.27
        assert weights.kind_of(w).name.startswith(name.split("-")[0]), name


@pytest.mark.parametrize("name", ["torchao-nf4", "bnb-nf4-dq"])
def test_the_export_front_end_refuses_quantized_weights_with_the_fix(name):
    model = kind(name).build(torch.float32)
    with pytest.raises(lora_fx.TraceError, match=r"(?s)cannot capture quantized weights \(2: 0\.weight \((torchao-nf4|bnb-4bit)\)"
                                                  r".*frontend='fx'"):
        lora_fx.transform(model, rank=4, frontend="export", example_inputs=(_x(torch.float32),))
