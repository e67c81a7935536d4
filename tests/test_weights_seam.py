"""The weight seam: a new kind of base weight is one ``WeightKind`` entry.

The kind here stores int8 codes *flat* (storage shape ``(out·in,)``, integer dtype) with one float
scale per row: its logical shape ``(out, in)`` and dtype differ from the storage's, as for
quantized backends.  With its entry (and a rule for the module consuming it), the weight is a
site, gets factors of its logical shape, is exact against the functional reference on the
dequantized weight in both lowerings, folds through the kind, and PiSSA refuses to write it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx import ops, weights
from lora_fx.errors import ConfigError
from lora_fx.rules import Factored, ModuleRule

from _reference import check_matches_reference, randomize_
from _tolerance import assert_close


# --- the example of the "Extending" docs page: a new weight backend, one entry ---------------------

class FlatInt8(nn.Parameter):
    """Frozen int8 codes stored flat, one scale per output row: ``W = codes.view(shape) · scale[:, None]``."""

    def __new__(cls, codes: torch.Tensor, scale: torch.Tensor, shape: tuple):
        w = torch.Tensor._make_subclass(cls, codes, False)
        w.scale, w.logical = scale, tuple(shape)
        return w

    def __deepcopy__(self, memo):
        return memo.setdefault(id(self), FlatInt8(self.data.clone(), self.scale.clone(), self.logical))

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "FlatInt8":
        scale = w.abs().amax(dim=1).clamp_min(1e-8) / 127
        return cls(torch.round(w / scale[:, None]).to(torch.int8).flatten(), scale, w.shape)


class FlatInt8Kind(weights.WeightKind):
    name = "flat-int8"

    def shape(self, w):
        return w.logical

    def dtype(self, w):
        return w.scale.dtype

    def dequantize(self, w):
        return w.data.to(w.scale.dtype).view(w.logical) * w.scale[:, None]

    def writable(self, w):
        return False  # fold_into: the default, a float weight of the logical shape


weights.register_weight_kind(FlatInt8, FlatInt8Kind())


class QLinear(nn.Module):
    """A linear layer on a FlatInt8 weight (or on a float one, after fold)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = FlatInt8.quantize(linear.weight.detach())
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, weights.dequantize(self.weight), self.bias)


# linear in its (dequantized) weight: factored like nn.Linear, never touching W
lora_fx.register_module_rule(QLinear, ModuleRule(
    kind=lambda m: "linear", weights=lambda m: ("weight",),
    factored=lambda node, m, pname: Factored.linear(node.args[0])))

# -------------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(7, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.q(x)))


def _pair():
    """A model with a quantized ``q`` and its float twin holding the dequantized weight."""
    torch.manual_seed(0)
    twin = Net()
    model = copy.deepcopy(twin)
    model.q = QLinear(twin.q)
    with torch.no_grad():
        twin.q.weight.copy_(weights.dequantize(model.q.weight))
    return model, twin, torch.randn(4, 5, 7)


def test_kind_lookup_and_logical_view():
    model, _, _ = _pair()
    w = model.q.weight
    assert weights.kind_of(w).name == "flat-int8" and weights.kind_of(torch.zeros(2, 2)) is weights.TENSOR
    assert tuple(w.shape) == (42,) and w.dtype == torch.int8  # storage
    assert weights.logical_shape(w) == (6, 7) and weights.compute_dtype(w) == torch.float32
    assert weights.reason(w) is None and weights.reason(torch.zeros(3, dtype=torch.int8)).startswith("it is 1-D")
    assert weights.reason(torch.zeros(3, 3, dtype=torch.int8)) == "its dtype torch.int8 is not floating point"


@pytest.mark.parametrize("lowering", ["factored", "merge"])
def test_quantized_weight_is_a_site_exact_against_the_dequantized_reference(lowering):
    model, twin, x = _pair()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = lora_fx.transform(model, rank=2, leaf_modules=["q"], lowering=lowering)
    merge_warnings = [w for w in caught if "is a flat-int8 weight used by linear" in str(w.message)]
    assert len(merge_warnings) == (lowering == "merge")  # a merge materialises the dequantized weight: says so
    site = {s.param: s for s in lora_fx.sites(gm)}["q.weight"]
    assert site.shape == (6, 7) and tuple(site.lora_A.shape) == (2, 7) and site.lora_A.dtype == torch.float32
    assert site.lowering == lowering
    calls = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert (ops.dequantized in calls) == (lowering == "merge")  # a merge reads the dequantized weight
    randomize_(gm)
    out = check_matches_reference(twin, gm, (x,))
    folded = lora_fx.fold(gm)
    fw = folded.get_parameter("q.weight")
    assert type(fw) is nn.Parameter and fw.dtype == torch.float32 and tuple(fw.shape) == (6, 7)
    assert ops.dequantized not in [n.target for m in folded.modules() if isinstance(m, torch.fx.GraphModule)
                                   for n in m.graph.nodes]
    assert_close(folded(x), out.detach(), dtype=torch.float32)
    assert isinstance(model.q.weight, FlatInt8)  # the user's model keeps its weight


def test_pissa_refuses_a_weight_it_cannot_write():
    model, _, _ = _pair()
    with pytest.raises(ConfigError, match="'q.weight', a flat-int8 weight lora_fx cannot write"):
        lora_fx.transform(model, rank=2, leaf_modules=["q"], init="pissa", targets=["q.weight"])


def test_dora_reads_the_dequantized_weight():
    model, twin, x = _pair()
    with pytest.warns(lora_fx.LoraFxWarning, match="'q.weight' is a flat-int8 weight used by linear"):
        gm = lora_fx.transform(model, rank=2, leaf_modules=["q"], use_dora=True, targets=["q.weight"])
    a = lora_fx.sites(gm)[0].module
    assert_close(a.lora_magnitude.detach(), twin.q.weight.detach().norm(dim=1), dtype=torch.float32)
    with torch.no_grad():
        assert_close(gm(x), twin(x), dtype=torch.float32)  # B = 0: the model is unchanged
