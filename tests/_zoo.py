"""The site zoo: one tiny model per site kind (module and functional forms), with non-square
weights, its inputs and what lora_fx must report for it.

Each :class:`SiteCase` builds a fresh model (seeded) and fresh inputs (seeded); ``op`` is the kind
``lora_fx.sites`` reports for the first site, ``factorable`` whether a factored delta is exact for
it (``lowering="factored"`` gives the ``delta`` node; otherwise merge), ``n`` the number of sites
under the default targets, ``kw`` extra ``transform`` keywords.  :func:`expected_lowering` says which
lowering each site must get.  Used by the site, lowering, compile and fold tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SiteCase", "SITES", "ZOO", "case_ids", "build", "expected_lowering", "TanhMLP", "CallCounter"]


class TanhMLP(nn.Module):
    """Two linears (6 → 8 → 5) around a tanh: the small model of the adapter-file tests."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class CallCounter(nn.Module):
    """Python state (a call count) that export bakes in: each call multiplies by the count so far."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.calls


@dataclass(frozen=True)
class SiteCase:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[], tuple]
    op: str
    factorable: bool
    n: int = 1
    delta: str = ""  # the factored op's name (lora_fx.ops)
    kw: dict = field(default_factory=dict)


class SelfAttn(nn.Module):
    def __init__(self, kdim=None):
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2, batch_first=True, kdim=kdim, vdim=kdim)
        self.kdim = kdim or 8

    def forward(self, x):
        kv = x[..., : self.kdim] if self.kdim <= 8 else x
        return self.att(x, kv, kv, need_weights=False)[0]


class Wrap(nn.Module):
    """Calls one leaf module; adds a non-linearity so gradients are non-trivial."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return torch.tanh(self.layer(x))


class Fn(nn.Module):
    """A module whose forward calls ``fn(self, x)`` on parameters it owns (functional sites)."""

    def __init__(self, fn, **shapes):
        super().__init__()
        self.fn = fn
        for name, shape in shapes.items():
            if shape is not None:
                setattr(self, name, nn.Parameter(torch.randn(*shape) * 0.3))

    def forward(self, x):
        return torch.tanh(self.fn(self, x))


def _seeded(make):
    def build():
        torch.manual_seed(11)
        return make()
    return build


def _mha(kdim=None):
    return _seeded(lambda: SelfAttn(kdim))


def mod(layer_fn):
    return _seeded(lambda: Wrap(layer_fn()))


def fn(f, **shapes):
    return _seeded(lambda: Fn(f, **shapes))


def _g():
    return torch.Generator().manual_seed(3)


def _x(*shape):
    return lambda: (torch.randn(*shape, generator=_g()),)


def _idx(high, *shape):
    return lambda: (torch.randint(0, high, shape, generator=_g()),)


PLAIN_IN_PROJ = {"fused": {"*.in_proj_weight": None}}

SITES = [
    # --- nn.Linear / nn.Embedding
    SiteCase("Linear", mod(lambda: nn.Linear(6, 10)), _x(3, 6), "linear", True, delta="linear_delta"),
    SiteCase("Linear-3d-nobias", mod(lambda: nn.Linear(7, 5, bias=False)), _x(2, 3, 7), "linear", True, delta="linear_delta"),
    SiteCase("Linear-3d", mod(lambda: nn.Linear(12, 10)), _x(3, 5, 12), "linear", True, delta="linear_delta"),
    SiteCase("Embedding", mod(lambda: nn.Embedding(20, 7)), _idx(20, 2, 5), "embedding", True, delta="embedding_delta"),
    SiteCase("Embedding-square", mod(lambda: nn.Embedding(12, 12)), _idx(12, 2, 9), "embedding", True,
         delta="embedding_delta"),
    SiteCase("Embedding-padding_idx", mod(lambda: nn.Embedding(12, 5, padding_idx=0)), _idx(12, 3, 4), "embedding", True,
         delta="embedding_delta"),
    SiteCase("Embedding-freq-pad", mod(lambda: nn.Embedding(9, 5, padding_idx=2, scale_grad_by_freq=True)),
         lambda: (torch.tensor([[2, 1, 1, 0], [3, 2, 8, 1]]),), "embedding", True, delta="embedding_delta"),
    SiteCase("Embedding-max_norm", mod(lambda: nn.Embedding(12, 5, max_norm=1.0)), _idx(12, 3, 4), "embedding", False),
    # --- nn.ConvNd
    SiteCase("Conv1d", mod(lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1)), _x(2, 4, 9), "conv1d", True, delta="conv_delta"),
    SiteCase("Conv2d-tuple", mod(lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
         _x(2, 3, 7, 8), "conv2d", True, delta="conv_delta"),
    SiteCase("Conv2d-dilated", mod(lambda: nn.Conv2d(4, 6, (3, 2), padding=1, dilation=(1, 2))), _x(2, 4, 7, 8),
         "conv2d", True, delta="conv_delta"),
    SiteCase("Conv2d-same", mod(lambda: nn.Conv2d(3, 5, (3, 4), padding="same", dilation=(2, 1))), _x(2, 3, 6, 7),
         "conv2d", True, delta="conv_delta"),
    SiteCase("Conv2d-valid", mod(lambda: nn.Conv2d(3, 5, 2, padding="valid", bias=False)), _x(1, 3, 5, 6),
         "conv2d", True, delta="conv_delta"),
    SiteCase("Conv2d-groups", mod(lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2)), _x(2, 4, 5, 6), "conv2d", False),
    SiteCase("Conv2d-depthwise", mod(lambda: nn.Conv2d(3, 6, 3, groups=3)), _x(2, 3, 5, 6), "conv2d", False),
    SiteCase("Conv2d-reflect", mod(lambda: nn.Conv2d(3, 5, 3, padding=(1, 2), padding_mode="reflect")), _x(2, 3, 5, 6),
         "conv2d", False),
    SiteCase("Conv2d-circular", mod(lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular")), _x(2, 4, 5, 6),
         "conv2d", False),
    SiteCase("Conv1d-circular", mod(lambda: nn.Conv1d(3, 5, 3, padding=2, stride=2, padding_mode="circular")),
         _x(2, 3, 9), "conv1d", False),
    SiteCase("Conv3d-replicate", mod(lambda: nn.Conv3d(2, 3, (2, 3, 1), padding=1, padding_mode="replicate")),
         _x(1, 2, 4, 5, 3), "conv3d", False),
    SiteCase("Conv3d", mod(lambda: nn.Conv3d(2, 4, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 0))), _x(1, 2, 4, 5, 3),
         "conv3d", True, delta="conv_delta"),
    # --- nn.ConvTransposeNd
    SiteCase("ConvTranspose1d", mod(lambda: nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1)),
         _x(2, 4, 5), "conv_transpose1d", False),
    SiteCase("ConvTranspose2d", mod(lambda: nn.ConvTranspose2d(4, 6, 3, stride=2)), _x(2, 4, 5, 5),
         "conv_transpose2d", False),
    SiteCase("ConvTranspose2d-groups", mod(lambda: nn.ConvTranspose2d(4, 6, (3, 2), stride=2, groups=2, dilation=(1, 2),
                                                                  output_padding=(1, 0))),
         _x(2, 4, 3, 4), "conv_transpose2d", False),
    SiteCase("ConvTranspose3d", mod(lambda: nn.ConvTranspose3d(4, 3, 2, stride=(2, 1, 2), bias=False)), _x(1, 4, 3, 2, 3),
         "conv_transpose3d", False),
    # --- nn.MultiheadAttention (whole leaf called with substituted parameters)
    SiteCase("MHA", _mha(), _x(2, 3, 8), "mha", False, n=2, kw=PLAIN_IN_PROJ),
    SiteCase("MHA-fused", _mha(), _x(2, 5, 8), "mha", False, n=2),  # in_proj_weight as q, k, v blocks (the default)
    SiteCase("MHA-kdim", _mha(6), _x(2, 3, 8), "mha", False, n=4),
    # --- functional forms on module attributes
    SiteCase("F.linear", fn(lambda m, x: F.linear(x, m.w, m.b), w=(9, 4), b=(9,)), _x(3, 4), "linear", True,
         delta="linear_delta"),
    SiteCase("F.linear-kw", fn(lambda m, x: F.linear(x, weight=m.w), w=(5, 4)), _x(2, 3, 4), "linear", True,
         delta="linear_delta"),
    SiteCase("F.embedding", fn(lambda m, x: F.embedding(x, m.w), w=(15, 6)), _idx(15, 2, 4), "embedding", True,
         delta="embedding_delta"),
    SiteCase("F.embedding-neg-pad", fn(lambda m, x: F.embedding(x, m.w, padding_idx=-1), w=(6, 4)),
         lambda: (torch.tensor([[5, 1, 5], [0, 3, 4]]),), "embedding", True, delta="embedding_delta"),
    SiteCase("F.embedding-positional-pad-freq", fn(lambda m, x: F.embedding(x, m.w, -1, None, 2.0, True), w=(7, 5)),
         _idx(7, 3, 9), "embedding", True, delta="embedding_delta"),
    SiteCase("F.conv1d", fn(lambda m, x: F.conv1d(x, m.w, None, 2, 1), w=(6, 4, 3)), _x(2, 4, 9), "conv1d", True,
         delta="conv_delta"),
    SiteCase("F.conv2d-stride", fn(lambda m, x: F.conv2d(x, m.w, None, 2), w=(5, 3, 3, 3)), _x(2, 3, 9, 9), "conv2d", True,
         delta="conv_delta"),
    SiteCase("F.conv2d-same", fn(lambda m, x: F.conv2d(x, m.w, padding="same", dilation=2), w=(5, 3, 3, 2)),
         _x(2, 3, 6, 7), "conv2d", True, delta="conv_delta"),
    SiteCase("F.conv2d-groups", fn(lambda m, x: F.conv2d(x, m.w, groups=2, stride=(1, 2)), w=(6, 2, 3, 3)),
         _x(2, 4, 5, 7), "conv2d", False),
    SiteCase("F.conv3d", fn(lambda m, x: F.conv3d(x, m.w, m.b, 1, (1, 0, 1)), w=(4, 2, 2, 3, 2), b=(4,)),
         _x(1, 2, 3, 5, 4), "conv3d", True, delta="conv_delta"),
    SiteCase("F.conv_transpose1d", fn(lambda m, x: F.conv_transpose1d(x, m.w, None, 2, 1, 1), w=(4, 3, 3)),
         _x(2, 4, 5), "conv_transpose1d", False),
    SiteCase("F.conv_transpose2d-groups", fn(lambda m, x: F.conv_transpose2d(x, m.w, stride=2, groups=2, dilation=(2, 1),
                                                                          output_padding=(1, 1)), w=(4, 3, 2, 3)),
         _x(2, 4, 3, 4), "conv_transpose2d", False),
    SiteCase("F.conv_transpose3d", fn(lambda m, x: F.conv_transpose3d(x, m.w, m.b, stride=(1, 2, 1)), w=(4, 3, 2, 2, 2),
                                  b=(3,)), _x(1, 4, 2, 3, 2), "conv_transpose3d", False),
    SiteCase("matmul-right", fn(lambda m, x: torch.matmul(x, m.w), w=(6, 4)), _x(2, 3, 6), "matmul", True,
         delta="matmul_delta"),
    SiteCase("matmul-right-operator", fn(lambda m, x: x @ m.w, w=(12, 10)), _x(3, 4, 12), "matmul", True,
         delta="matmul_delta"),
    SiteCase("matmul-left", fn(lambda m, x: m.w @ x, w=(5, 3)), _x(2, 3, 4), "matmul", True, delta="matmul_delta"),
    SiteCase("matmul-left-2d", fn(lambda m, x: torch.matmul(m.w, x), w=(10, 12)), _x(12, 7), "matmul", True,
         delta="matmul_delta"),
    SiteCase("matmul-method", fn(lambda m, x: x.matmul(m.w), w=(6, 4)), _x(3, 6), "matmul", True, delta="matmul_delta"),
    SiteCase("matmul-vector", fn(lambda m, x: (x[0] @ m.w).unsqueeze(0), w=(6, 4)), _x(3, 6), "matmul", True,
         delta="matmul_delta"),
    SiteCase("matmul-t-view", fn(lambda m, x: x @ m.w.t(), w=(4, 6)), _x(3, 6), "matmul (via view)", False),
    SiteCase("matmul-T-left", fn(lambda m, x: m.w.t() @ x, w=(3, 5)), _x(2, 3, 4), "matmul (via view)", False),
    SiteCase("F.linear-t-view", fn(lambda m, x: F.linear(x, m.w.t()), w=(6, 4)), _x(3, 6), "linear (via view)", False),
    SiteCase("addmm-alpha", fn(lambda m, x: torch.addmm(m.b, x, m.w, beta=0.5, alpha=2.0), w=(6, 4), b=(4,)), _x(3, 6),
         "addmm", False),
    SiteCase("matmul-batched-param", fn(lambda m, x: x @ m.w, w=(3, 6, 4)), _x(3, 2, 6), "matmul", False),
    SiteCase("mm", fn(lambda m, x: torch.mm(x, m.w), w=(6, 4)), _x(3, 6), "matmul", True, delta="matmul_delta"),
    SiteCase("addmm-right", fn(lambda m, x: torch.addmm(m.b, x, m.w), w=(6, 4), b=(4,)), _x(3, 6), "addmm", True,
         delta="matmul_delta"),
    SiteCase("addmm-left", fn(lambda m, x: torch.addmm(m.b, m.w, x), w=(5, 3), b=(5, 1)), _x(3, 4), "addmm", True,
         delta="matmul_delta"),
]

ZOO = {c.name: c for c in SITES}


def case_ids(cases=SITES) -> list[str]:
    return [c.name for c in cases]


def build(case: SiteCase, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, tuple]:
    """A fresh model of ``case`` in ``dtype`` and its inputs (floating inputs in ``dtype``)."""
    model = case.make().to(dtype)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in case.inputs())
    return model, inputs


def expected_lowering(case: SiteCase, lowering: str, rank: int, shape) -> str:
    """The lowering a site of ``case`` (weight ``shape``) must get: merge unless a factored delta is
    exact (``case.factorable``) and asked for; ``"auto"`` factors a convolution only while its rank
    is small (``2·rank < min(fan_out, fan_in)``: the factored form runs two convolutions)."""
    if lowering == "merge" or not case.factorable:
        return "merge"
    if lowering == "auto" and case.op.startswith("conv"):
        return "factored" if 2 * rank < min(shape[0], math.prod(shape[1:])) else "merge"
    return "factored"
