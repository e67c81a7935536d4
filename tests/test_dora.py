"""DoRA (use_dora=True): outputs, gradients and fold versus the functional reference
``W' = m · V / ‖V‖_row``, ``V = W + s·(B@A).reshape(W.shape)`` (tests/_reference.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from _reference import randomize_, reference_call, reference_overrides
from _tolerance import assert_close, assert_not_close
from lora_fx.ops import dora_merge


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 12)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.fc = nn.Linear(12 + 5, 9)

    def forward(self, idx, img):
        h = self.emb(idx).mean(1)
        c = F.relu(self.conv(img)).mean((2, 3))
        return self.fc(torch.cat([h, c], -1))


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 30, (4, 6), generator=g), torch.randn(4, 3, 6, 6, generator=g).to(dtype)


def _randomise(gm, seed=2):
    randomize_(gm, seed=seed, scale=0.3, magnitude=0.2)


def test_dora_unchanged_at_init_and_magnitude_is_row_norm():
    model = Net()
    gm = lora_fx.transform(model, rank=3, use_dora=True)
    for s in lora_fx.sites(gm):
        assert s.lowering == "merge"
        w = model.get_parameter(s.param)
        assert_close(s.module.lora_magnitude.detach(), w.flatten(1).norm(dim=1))
    x = _inputs()
    assert_close(gm(*x), model(*x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_outputs_and_gradients_vs_reference(dtype):
    model = Net().to(dtype)
    gm = lora_fx.transform(model, rank=3, alpha=5, use_dora=True)
    _randomise(gm)
    idx, img = _inputs(dtype)
    out = gm(idx, img)
    assert out.dtype == dtype
    ref = reference_call(model, gm, (idx, img))
    assert_close(out, ref, dtype=dtype)
    params = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B, s.module.lora_magnitude)]
    g1 = torch.autograd.grad(out.float().square().sum(), params)
    ref = reference_call(model, gm, (idx, img))
    g2 = torch.autograd.grad(ref.float().square().sum(), params)
    for a, b in zip(g1, g2):
        assert_close(a, b, dtype=dtype)


def test_dora_fold_matches_and_loads_strict():
    model = Net()
    gm = lora_fx.transform(model, rank=2, use_dora=True)
    _randomise(gm)
    x = _inputs()
    folded = lora_fx.fold(gm)
    plain = Net()
    plain.load_state_dict(folded.state_dict(), strict=True)
    assert_close(plain(*x), gm(*x))
    for name, w in reference_overrides(model, gm).items():
        assert_close(folded.get_parameter(name), w.detach())


def test_disabled_dora_is_exactly_the_base_model():
    model = Net()
    gm = lora_fx.transform(model, rank=2, use_dora=True)
    _randomise(gm)
    x = _inputs()
    assert_not_close(gm(*x), model(*x))
    with lora_fx.disable_adapters(gm):
        assert torch.equal(gm(*x), model(*x))
    # the reference's DoRA gate: a disabled adapter is exactly W
    assert_close(gm(*x), reference_call(model, gm, x))
    with lora_fx.disable_adapters(gm):
        assert torch.equal(reference_call(model, gm, x), model(*x))


def test_dora_merge_gate_interpolates():
    w = torch.randn(4, 6, dtype=torch.float64)
    a, b = torch.randn(2, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    m = torch.rand(4, dtype=torch.float64) + 0.5
    full = dora_merge(w, a, b, torch.tensor(0.5, dtype=torch.float64), m, 0.5)
    v = w + 0.5 * b @ a
    assert_close(full, m[:, None] * v / v.norm(dim=1, keepdim=True))
    half = dora_merge(w, a, b, torch.tensor(0.25, dtype=torch.float64), m, 0.5)
    assert_close(half, w + 0.5 * (full - w))
    assert torch.equal(dora_merge(w, a, b, torch.tensor(0.0, dtype=torch.float64), m, 0.5), w)


def test_dora_zero_row_stays_finite():
    """An embedding's zero padding row has norm 0: no 0/0, outputs and gradients stay finite."""
    emb = nn.Embedding(10, 4, padding_idx=0)
    gm = lora_fx.transform(emb, rank=2, use_dora=True)
    idx = torch.tensor([[0, 1, 2]])
    out = gm(idx)
    assert torch.equal(out[0, 0], torch.zeros(4))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in lora_fx.adapter_parameters(gm))
    with lora_fx.disable_adapters(gm):
        assert torch.equal(gm(idx), emb(idx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_fresh_dora_adapters_are_the_model_bit_for_bit(kind, dtype):
    """``W · (m / ‖W‖)`` with ``m = ‖W‖``: the factor is exactly 1 (``m · W / ‖W‖`` rounds)."""
    torch.manual_seed(0)
    layer, x = {"linear": (nn.Linear(32, 16), torch.randn(4, 32)),
                "conv2d": (nn.Conv2d(3, 8, 3), torch.randn(4, 3, 8, 8)),
                "embedding": (nn.Embedding(20, 12), torch.randint(0, 20, (4, 5)))}[kind]
    model = nn.Sequential(layer).to(dtype)
    x = x.to(dtype) if x.is_floating_point() else x
    gm = lora_fx.transform(model, rank=4, use_dora=True)
    for mode in ("train", "eval"):
        getattr(gm, mode)()
        with torch.no_grad():
            assert torch.equal(gm(x), model(x)), mode
