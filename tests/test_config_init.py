"""LoraConfig, rank/alpha patterns, rsLoRA and init schemes (kaiming, gaussian, PiSSA), against
the functional reference built from the factors (tests/_reference.py)."""

import math

import pytest
import torch
from torch import nn

import lora_fx
from _reference import randomize_, reference_call
from _tolerance import assert_close
from lora_fx import ConfigError, LoraConfig, TargetError


class MLP(nn.Module):
    def __init__(self, d_in=12, hidden=20, d_out=7):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _randomise(gm, seed=1):
    randomize_(gm, seed=seed, scale=0.3)


def _reference(model, gm, x, base=None):
    """The original model with ``W + s·B@A`` (``W`` from ``base`` where given: PiSSA residuals)."""
    return reference_call(model, gm, (x,), base=base)


def test_config_roundtrip_and_keywords_override():
    cfg = LoraConfig(rank=4, alpha=8, targets="fc*.weight", use_rslora=True, init="pissa", use_dora=True,
                     rank_pattern={"fc2.weight": 2})
    again = LoraConfig.from_json(cfg.to_json())
    assert again == cfg and again.targets == ("fc*.weight",)
    gm = lora_fx.transform(MLP(), config=cfg, rank=3, use_dora=False, init="kaiming")
    assert {s.param: s.rank for s in lora_fx.sites(gm)} == {"fc1.weight": 3, "fc2.weight": 2}
    assert gm._lora_fx_configs["default"].use_dora is False
    with pytest.raises(ConfigError, match="init must be one of"):
        LoraConfig(init="svd")
    with pytest.raises(ConfigError, match="use_dora"):
        LoraConfig(use_dora="yes")
    with pytest.raises(ConfigError, match="unknown LoraConfig field"):
        LoraConfig.from_dict({"rank": 2, "lora_alpha": 4})


def test_rank_and_alpha_patterns_resolve_independently():
    gm = lora_fx.transform(MLP(), rank=4, alpha=8, rank_pattern={"fc1.*": 2}, alpha_pattern={"fc2.*": 3.0})
    got = {s.param: (s.rank, s.alpha, s.scaling) for s in lora_fx.sites(gm)}
    # fc1: rank from the pattern, alpha from the default; fc2: the other way round
    assert got == {"fc1.weight": (2, 8.0, 4.0), "fc2.weight": (4, 3.0, 0.75)}


@pytest.mark.parametrize("kw", [dict(rank_pattern={"fc9.*": 2}), dict(alpha_pattern={"nope": 1.0})])
def test_unmatched_pattern_is_an_error(kw):
    with pytest.raises(TargetError, match="matches no targeted parameter"):
        lora_fx.transform(MLP(), rank=2, **kw)


def test_rslora_scaling_and_output_vs_reference():
    model = MLP()
    gm = lora_fx.transform(model, rank=4, alpha=6, use_rslora=True)
    assert all(math.isclose(s.scaling, 6 / math.sqrt(4)) for s in lora_fx.sites(gm))
    _randomise(gm)
    x = torch.randn(5, 12)
    assert_close(gm(x), _reference(model, gm, x))


def test_gaussian_init_has_zero_delta():
    model = MLP(64, 64, 64)
    gm = lora_fx.transform(model, rank=8, init="gaussian")
    for s in lora_fx.sites(gm):
        assert torch.count_nonzero(s.lora_B) == 0
        # N(0, 1/r²) over 8·64 = 512 seeded draws: the sample std is within 0.125/sqrt(2·512) ≈ 0.004
        # of 1/8 per standard error, so 0.02 is 5 standard errors (a wrong std, 1/sqrt(r), is 0.23 off)
        assert abs(float(s.lora_A.detach().std()) - 1 / 8) < 0.02
    x = torch.randn(3, 64)
    assert_close(gm(x), model(x), ulps=0)


@pytest.mark.filterwarnings("ignore::lora_fx.LoraFxWarning")
@pytest.mark.parametrize("rank", [3, 12])
def test_pissa_principal_part_residual_and_fold(rank):
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 12)
    gm = lora_fx.transform(model, rank=rank, alpha=2 * rank, init="pissa")
    # unchanged at init, and the user's model is untouched
    assert_close(gm(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for s in lora_fx.sites(gm):
        w0 = model.get_parameter(s.param)
        u, sv, vh = torch.linalg.svd(w0, full_matrices=False)
        k = min(rank, sv.numel())
        principal = (u[:, :k] * sv[:k]) @ vh[:k]
        assert_close(s.scaling * s.lora_B @ s.lora_A, principal)
        # at full rank the residual is ~0: rounding is relative to W's magnitude, not the residual's
        assert_close(gm.get_parameter(s.param), w0 - principal, scale=w0.abs().max())
        assert gm.get_parameter(s.param).data_ptr() != w0.data_ptr()
    init = {s.param: (s.scaling * s.lora_B @ s.lora_A).detach().clone() for s in lora_fx.sites(gm)}
    _randomise(gm)
    # fold: W_res + s·B@A == original W + learned change (s·B@A - s·B0@A0)
    folded = lora_fx.fold(gm)
    for s in lora_fx.sites(gm):
        learned = s.scaling * s.lora_B @ s.lora_A - init[s.param]
        assert_close(folded.get_parameter(s.param), model.get_parameter(s.param) + learned.detach())
    # outputs and gradients versus the functional reference on the residual weights
    residual = {s.param: gm.get_parameter(s.param).detach() for s in lora_fx.sites(gm)}
    out = gm(x)
    ref = _reference(model, gm, x, residual)
    assert_close(out, ref)
    g1 = torch.autograd.grad(out.square().sum(), [s.lora_A for s in lora_fx.sites(gm)])
    g2 = torch.autograd.grad(_reference(model, gm, x, residual).square().sum(), [s.lora_A for s in lora_fx.sites(gm)])
    for a, b in zip(g1, g2):
        assert_close(a, b)


def test_pissa_refuses_shared_weights_and_untargeted_aliases():
    with pytest.raises(ConfigError, match="copy_weights=False"):
        lora_fx.transform(MLP(), rank=2, init="pissa", copy_weights=False)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6, bias=False)
            self.b = nn.Linear(6, 6, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    with pytest.raises(ConfigError, match="shares its tensor"):
        lora_fx.transform(Tied(), rank=2, init="pissa", targets=["a.weight"])


def test_pissa_bf16_weight_stays_close():
    model = MLP().to(torch.bfloat16)
    gm = lora_fx.transform(model, rank=4, init="pissa")
    x = torch.randn(4, 12, dtype=torch.bfloat16)
    out = gm(x)
    assert out.dtype == torch.bfloat16
    assert_close(out, model(x), dtype=torch.bfloat16)  # one bf16 rounding of W_res
