"""The graph op of per-sample adapter routing: one node per factored site holding every adapter there.

Outside :func:`lora_fx.route_adapters` (the route buffer is empty) :func:`routed_delta` computes
what the chain of delta nodes it replaced computed, call for call: ``y + Σ_i s_i·ΔW_i x`` with each
adapter's own ``scaling`` (mixing weight, enabled flag) and dropout.

Inside, ``route (b,)`` holds each sample's adapter (its index in the model's adapter list; ``-1``
for the base model) and sample ``j`` sees only its adapter: ``y_j + s_{route[j]}·ΔW_{route[j]} x_j``,
as if that adapter ran alone (:func:`lora_fx.route_adapters` sets every routed adapter's
``scaling`` to its base ``alpha / r`` meanwhile: PEFT's ``adapter_names`` semantics).  Two lowerings, one
function, chosen statically per site (:data:`MASKED_MAX_RATIO`):

* ``"masked"``: ``A_cat = cat_i A_i (Σr, in)``, ``B_cat (out, Σr)``, ``c[j, k] = s_owner(k) ·
  [owner(k) == route[j]]``; ``y + ((x A_catᵀ) ⊙ c) B_catᵀ``: dense GEMMs only, ``Σr`` per token;
* ``"gather"``: factors zero-padded to ``R = max r`` and stacked with a zero row for the base,
  ``A_pad (n+1, R, in)``, gathered per sample, ``y + bmm(bmm(x, A_pad[idx]ᵀ)·s[idx], B_pad[idx]ᵀ)``:
  ``R`` per token whatever ``n`` (linear sites).

Other adapters' terms are multiplied by exact zeros (masked) or never gathered, so outputs and
gradients equal each adapter alone on its samples, and adapters no sample uses get exact-zero
gradients.  Rows of ``x`` map to samples along dim 0: ``x (b, ...)``, or a flattened
``(b·L, ...)`` in sample-major order.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops
from .errors import RoutingError
from .recompute import _to, down

__all__ = ["routed_delta", "MASKED_MAX_RATIO", "choose_algo", "ROUTED_KINDS"]

#: ``"masked"`` when ``Σ ranks ≤ MASKED_MAX_RATIO · max rank`` at a site, else ``"gather"``
#: (``benchmarks/bench_route.py`` measures both).
MASKED_MAX_RATIO = 2.0
#: The delta ops a routed node can stand for, by kind.
ROUTED_KINDS = {"linear": ops.linear_delta, "matmul": ops.matmul_delta, "embedding": ops.embedding_delta,
                "conv": ops.conv_delta}


def choose_algo(kind: str, ranks) -> str:
    """The lowering of a routed site with adapters of ``ranks``: ``"gather"`` for linear sites whose
    total rank exceeds :data:`MASKED_MAX_RATIO` × the largest, else ``"masked"``."""
    ranks = list(ranks)
    return "gather" if kind == "linear" and sum(ranks) > MASKED_MAX_RATIO * max(ranks) else "masked"


def _chain(y, x, kind, adapters, extra, remat):
    """What the replaced chain computed: each adapter's delta op in order."""
    fn = ROUTED_KINDS[kind]
    for a, b, s, drop, _, blocks in adapters:
        xi = drop(x) if drop is not None else x
        args = (y, xi, a, b, s) + tuple(extra) + ((blocks,) if blocks is not None else ())
        y = fn(*args, remat=remat) if remat is not None and drop is None and kind == "linear" else fn(*args)
    return y


def _blockdiag_b(b: Tensor, a: Tensor, blocks) -> Tensor:
    """A fused adapter's ``B`` as one ``(out, n_on·r)`` matrix: block ``i``'s rows get ``B_i`` in
    columns ``i·r:(i+1)·r``, disabled blocks' rows are zero (exact: the zeros add exact zeros)."""
    n_on = sum(1 for _, on in blocks if on)
    r = a.shape[0] // n_on
    pieces, b0, i = [], 0, 0
    for rows, on in blocks:
        piece = b.new_zeros(rows, n_on * r)
        if on:
            piece = torch.cat([b.new_zeros(rows, i * r), b[b0:b0 + rows], b.new_zeros(rows, (n_on - i - 1) * r)], 1)
            b0 += rows
            i += 1
        pieces.append(piece)
    return torch.cat(pieces)


def _factors(adapters) -> tuple[list[Tensor], list[Tensor]]:
    """Plain ``(A_i (r_i, in), B_i (out, r_i))`` of each adapter (fused ones expanded)."""
    As, Bs = [], []
    for a, b, _, _, _, blocks in adapters:
        As.append(a)
        Bs.append(b if blocks is None else _blockdiag_b(b, a, blocks))
    return As, Bs


def _rows(coef: Tensor, x: Tensor, flat_ndim: int, site: str) -> Tensor:
    """``coef (b, k)`` per row of ``x`` (dim 0 the batch), or repeated per sample for an input
    flattened sample-major to ``(b·L, ...)`` of ``flat_ndim`` dims (0: never flattened)."""
    b, n = coef.shape[0], x.shape[0]
    if n == b:
        return coef
    if n % b == 0 and x.dim() == flat_ndim:
        return coef.repeat_interleave(n // b, dim=0)
    raise RoutingError(f"route_adapters got {b} adapter names, but site '{site}' sees an input with {n} rows along "
                       f"dim 0 (shape {tuple(x.shape)}); pass one name per sample of the batch (dim 0 of the inputs)")


def _coef(route: Tensor, adapters, widths, dtype) -> Tensor:
    """``c (b, Σ widths)``: ``s_i`` on the columns of sample ``j``'s adapter ``i``, 0 elsewhere."""
    cols = []
    for (_, _, s, _, gid, _), w in zip(adapters, widths):
        on = (route == gid).to(dtype) * s.to(dtype)
        cols.append(on[:, None].expand(route.shape[0], w))
    return torch.cat(cols, dim=1)


def _route_dropout(x: Tensor, adapters, route: Tensor) -> Tensor:
    """Each sample's adapter's LoRA dropout on ``x``: one draw for the batch, keep-probability and
    rescaling per sample (exact in distribution against running each adapter alone)."""
    drops = [(gid, d) for _, _, _, d, gid, _ in adapters if d is not None]
    if not drops or not any(d.training for _, d in drops):
        return x
    p = torch.zeros(route.shape[0], dtype=x.dtype, device=x.device)
    for gid, d in drops:
        p = torch.where(route == gid, torch.as_tensor(float(d.p), dtype=x.dtype, device=x.device), p)
    if x.shape[0] != route.shape[0]:
        p = p.repeat_interleave(x.shape[0] // route.shape[0])
    p = p.reshape((-1,) + (1,) * (x.dim() - 1))
    keep = (torch.rand_like(x) >= p).to(x.dtype)
    return x * keep / (1 - p)


def _masked(y, x, kind, adapters, route, extra, site, remat):
    As, Bs = _factors(adapters)
    widths = [a.shape[0] for a in As] if kind != "matmul" else [b.shape[1] for b in Bs]
    if kind == "embedding":
        return _masked_embedding(y, x, adapters, route, extra, site)
    a_cat = torch.cat(As) if kind != "matmul" else torch.cat(As, 0)
    b_cat = torch.cat(Bs, dim=1)
    coef = _coef(route, adapters, widths, a_cat.dtype)
    if kind == "linear":
        h = down(x, a_cat, torch.ones((), dtype=a_cat.dtype, device=a_cat.device), remat)  # (..., Σr)
        c = _rows(coef, x, 2, site)
        h = h * c.reshape(c.shape[:1] + (1,) * (h.dim() - 2) + c.shape[1:])
        return y + _to(F.linear(h, b_cat), y)
    if kind == "matmul":  # y = x @ W, W (in, out): B_i (in, r), A_i (r, out)
        if extra[0]:
            raise RoutingError(f"site '{site}' computes W @ x (its input's dim 0 is not the batch); it cannot be "
                               "routed per sample: exclude it from the routed adapters")
        h = _to(x, b_cat) @ b_cat
        c = _rows(coef, x, 2, site)
        h = h * c.reshape(c.shape[:1] + (1,) * (h.dim() - 2) + c.shape[1:])
        return y + _to(h @ a_cat, y)
    # conv: a rank-channel conv with A_cat, the per-sample columns, then a 1x1 conv with B_cat
    kernel_size, stride, padding, dilation = extra
    nd = len(kernel_size)
    conv = ops._CONV[nd]
    h = conv(_to(x, a_cat), a_cat.reshape(a_cat.shape[0], -1, *kernel_size), None, stride, padding, dilation, 1)
    c = _rows(coef, x, 0, site)
    h = h * c.reshape(c.shape + (1,) * nd)
    return y + _to(conv(h, b_cat.reshape(b_cat.shape[0], b_cat.shape[1], *([1] * nd))), y)


def _masked_embedding(y, indices, adapters, route, extra, site):
    """``y + (F.embedding(idx, B_cat) ⊙ c) @ A_cat`` with :func:`lora_fx.ops.embedding_delta`'s
    gradient re-weighting of ``A`` for ``padding_idx`` / ``scale_grad_by_freq``."""
    padding_idx, scale_grad_by_freq = extra
    As, Bs = _factors(adapters)
    a_cat, b_cat = torch.cat(As), torch.cat(Bs, dim=1)  # (Σr, dim), (num, Σr)
    coef = _coef(route, adapters, [a.shape[0] for a in As], a_cat.dtype)
    c = _rows(coef, indices, 1, site)
    rows = F.embedding(indices, b_cat, padding_idx, None, 2.0, scale_grad_by_freq, False)
    rows = rows * c.reshape(c.shape[:1] + (1,) * (rows.dim() - 2) + c.shape[1:])
    return ops.embedding_up(y, indices, rows, a_cat, b_cat.shape[0], padding_idx, scale_grad_by_freq)


def _gather(y, x, adapters, route, n_names: int, site):
    As, Bs = _factors(adapters)
    n, R = len(As), max(a.shape[0] for a in As)
    a_pad = torch.stack([a if a.shape[0] == R else F.pad(a, (0, 0, 0, R - a.shape[0])) for a in As]
                        + [As[0].new_zeros(R, As[0].shape[1])])
    b_pad = torch.stack([b if b.shape[1] == R else F.pad(b, (0, R - b.shape[1])) for b in Bs]
                        + [Bs[0].new_zeros(Bs[0].shape[0], R)])
    ids = [gid for _, _, _, _, gid, _ in adapters]
    lut = [n] * (n_names + 1)  # adapter index (-1: base, the last entry) -> local row; n: the zero row
    for i, gid in enumerate(ids):
        lut[gid] = i
    idx = torch.as_tensor(lut, device=route.device)[route]
    s = torch.stack([s.to(a_pad.dtype) for _, _, s, _, _, _ in adapters] + [a_pad.new_zeros(())])
    b = route.shape[0]
    _rows(route[:, None], x, 2, site)  # checks the rows
    x3 = _to(x, a_pad).reshape(b, -1, x.shape[-1])
    h = torch.bmm(x3, a_pad[idx].transpose(1, 2)) * s[idx].reshape(b, 1, 1)
    return y + _to(torch.bmm(h, b_pad[idx].transpose(1, 2)).reshape(y.shape), y)


@ops.delta_op
def routed_delta(y: Tensor, x: Tensor, kind: str, adapters: tuple, route: Tensor, n_names: int, extra: tuple,
                 algo: str, site: str, remat: Optional[tuple] = None) -> Tensor:
    """One routed site: the chain of ``kind``'s delta op over ``adapters`` outside routing, the
    per-sample lowering ``algo`` inside (see the module docstring).

    Args:
        y: the base op's output; x: its input (before any LoRA dropout; indices for embeddings).
        kind: ``"linear"``, ``"matmul"``, ``"embedding"`` or ``"conv"`` (:data:`ROUTED_KINDS`).
        adapters: per adapter ``(lora_A, lora_B, scaling, dropout module or None, index in the
            model's adapter list, fused blocks or None)``, in chain order.
        route: ``(b,)`` long, each sample's adapter index or ``-1``; empty outside routing.
        n_names: the number of adapters the indices refer to.
        extra: the delta op's trailing arguments (kernel size, padding index, ...).
        algo: ``"masked"`` or ``"gather"``.
        site: the site's name, for errors.
        remat: the recompute spec of the replaced linear chain (:func:`lora_fx.recompute.down`).

    Raises:
        RoutingError: the input's rows do not map to ``b`` samples (names both numbers and the site).
    """
    if route.numel() == 0:
        return _chain(y, x, kind, adapters, extra, remat)
    xr = _route_dropout(x, adapters, route) if kind != "embedding" else x
    if xr is not x:
        remat = None
    if algo == "gather" and kind == "linear":
        return _gather(y, xr, adapters, route, n_names, site)
    return _masked(y, xr, kind, adapters, route, extra, site, remat)
