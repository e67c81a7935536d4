"""One tiny model per site kind (shared by the lowering and compile tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Wrap(nn.Module):
    """``forward(x) = fn(self, x)`` around one child/parameter set (traceable by torch.fx)."""

    def __init__(self, fn, **children):
        super().__init__()
        self.fn = fn
        for k, v in children.items():
            if isinstance(v, nn.Parameter):
                self.register_parameter(k, v)
            else:
                self.add_module(k, v)

    def forward(self, x):
        return self.fn(self, x)


def _p(*shape):
    return nn.Parameter(torch.randn(*shape) * 0.3)


def _float(*shape):
    return lambda: torch.randn(*shape)


def _ints(n, *shape):
    return lambda: torch.randint(0, n, shape)


# name -> (model factory, input factory, targets, expected lowering under "auto" per target)
ZOO = {
    "linear": (lambda: Wrap(lambda s, x: s.m(x), m=nn.Linear(12, 10)), _float(3, 5, 12),
               ["m.weight"], ["factored"]),
    "f_linear": (lambda: Wrap(lambda s, x: F.linear(x, s.w, s.b), w=_p(10, 12), b=_p(10)), _float(4, 12),
                 ["w"], ["factored"]),
    "embedding": (lambda: Wrap(lambda s, x: s.m(x), m=nn.Embedding(20, 12, padding_idx=0)), _ints(20, 3, 7),
                  ["m.weight"], ["factored"]),
    "embedding_square": (lambda: Wrap(lambda s, x: s.m(x), m=nn.Embedding(12, 12)), _ints(12, 2, 9),
                         ["m.weight"], ["factored"]),
    "embedding_freq": (lambda: Wrap(lambda s, x: s.m(x), m=nn.Embedding(10, 6, padding_idx=2, scale_grad_by_freq=True)),
                       _ints(10, 4, 8), ["m.weight"], ["factored"]),
    "f_embedding_pad": (lambda: Wrap(lambda s, x: F.embedding(x, s.w, -1, None, 2.0, True), w=_p(7, 5)),
                        _ints(7, 3, 9), ["w"], ["factored"]),
    "f_embedding": (lambda: Wrap(lambda s, x: F.embedding(x, s.w), w=_p(15, 6)), _ints(15, 4, 3),
                    ["w"], ["factored"]),
    "conv1d": (lambda: Wrap(lambda s, x: s.m(x), m=nn.Conv1d(6, 5, 3, stride=2, padding=1)), _float(2, 6, 11),
               ["m.weight"], ["factored"]),
    "conv2d": (lambda: Wrap(lambda s, x: s.m(x), m=nn.Conv2d(4, 6, (3, 2), padding=1, dilation=(1, 2))),
               _float(2, 4, 7, 8), ["m.weight"], ["factored"]),
    "conv2d_groups": (lambda: Wrap(lambda s, x: s.m(x), m=nn.Conv2d(4, 6, 3, groups=2)), _float(2, 4, 6, 6),
                      ["m.weight"], ["merge"]),
    "conv2d_circular": (lambda: Wrap(lambda s, x: s.m(x), m=nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular")),
                        _float(2, 4, 5, 6), ["m.weight"], ["merge"]),
    "f_conv2d": (lambda: Wrap(lambda s, x: F.conv2d(x, s.w, None, 2), w=_p(5, 3, 3, 3)), _float(2, 3, 9, 9),
                 ["w"], ["factored"]),
    "conv3d": (lambda: Wrap(lambda s, x: s.m(x), m=nn.Conv3d(3, 8, 2)), _float(1, 3, 4, 5, 4),
               ["m.weight"], ["factored"]),
    "conv_transpose2d": (lambda: Wrap(lambda s, x: s.m(x), m=nn.ConvTranspose2d(4, 6, 3, stride=2)),
                         _float(2, 4, 5, 5), ["m.weight"], ["merge"]),
    "matmul_right": (lambda: Wrap(lambda s, x: x @ s.w, w=_p(12, 10)), _float(3, 4, 12), ["w"], ["factored"]),
    "matmul_left": (lambda: Wrap(lambda s, x: torch.matmul(s.w, x), w=_p(10, 12)), _float(12, 7),
                    ["w"], ["factored"]),
    "addmm": (lambda: Wrap(lambda s, x: torch.addmm(s.b, x, s.w), w=_p(12, 9), b=_p(9)), _float(5, 12),
              ["w"], ["factored"]),
    "mha": (lambda: Wrap(lambda s, x: s.m(x, x, x, need_weights=False)[0],
                         m=nn.MultiheadAttention(8, 2, batch_first=True)), _float(2, 5, 8),
            ["m.in_proj_weight", "m.out_proj.weight"], ["merge", "merge"]),
    "mha_kdim": (lambda: Wrap(lambda s, x: s.m(x, x[..., :6], x[..., :4], need_weights=False)[0],
                              m=nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)), _float(2, 5, 8),
                 ["m.q_proj_weight", "m.k_proj_weight", "m.v_proj_weight", "m.out_proj.weight"],
                 ["merge"] * 4),
}


def randomise_adapters_(gm, generator_seed: int = 1) -> None:
    """Non-zero random A and B on every adapter (so a missing or doubled delta shows)."""
    import lora_fx

    g = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_A.copy_(torch.randn(s.lora_A.shape, generator=g) * 0.5)
            s.lora_B.copy_(torch.randn(s.lora_B.shape, generator=g) * 0.5)


def reference_call(model, gm, x, *, overrides=None):
    """``functional_call(model, {W: W + s·(B@A).reshape(W.shape)})`` built from the factors
    (computed in float32, rounded once to W's dtype), plus ``{param fqn: (A, B)}`` leaves that
    require grad so the reference's gradients can be read."""
    import lora_fx

    params = dict(model.named_parameters())
    new, leaves = {}, {}
    for s in lora_fx.sites(gm):
        A = s.lora_A.detach().clone().requires_grad_(True)
        B = s.lora_B.detach().clone().requires_grad_(True)
        leaves[s.param] = (A, B)
        W = params[s.param]
        blocks = getattr(s.module, "blocks", None)
        if blocks is None:
            delta = (B.float() @ A.float()).reshape(W.shape) * float(s.scaling)
        else:  # fused (q/k/v) adapter: rows of block i are s·B_i @ A_i, disabled blocks zero
            rows, ia, ib, r = [], 0, 0, s.rank
            for _, n, on in blocks:
                if on:
                    rows.append(B[ib:ib + n].float() @ A[ia:ia + r].float() * float(s.scaling))
                    ia, ib = ia + r, ib + n
                else:
                    rows.append(torch.zeros(n, A.shape[1]))
            delta = torch.cat(rows).reshape(W.shape)
        new[s.param] = (W.detach().float() + delta).to(W.dtype)
    new.update(overrides or {})
    out = torch.func.functional_call(model, new, (x,))
    return out, leaves
