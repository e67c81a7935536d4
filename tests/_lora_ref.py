"""Independent references for LoRA tests: ΔW and the factor gradients are built here from the
documented layout (``lora_A: (n_enabled·r, fan_in)``, ``lora_B: (Σ enabled rows, r)``, blocks in
row order), never through lora_fx's own math."""

from __future__ import annotations

import math

import torch


def set_factors_(site, *, seed: int, scale: float = 0.2) -> None:
    """Non-zero, deterministic A and B for ``site`` (B starts at zero after transform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (site.lora_A, site.lora_B):
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def _pieces(site):
    """``[(row start, rows, A_i, B_i) or (row start, rows, None, None)]`` over the weight's rows."""
    a, b, r = site.lora_A.detach().float(), site.lora_B.detach().float(), site.rank
    blocks = site.blocks or (("all", site.shape[0], True),)
    out, start, b0, i = [], 0, 0, 0
    for _, rows, on in blocks:
        if on:
            out.append((start, rows, a[i * r:(i + 1) * r], b[b0:b0 + rows]))
            b0 += rows
            i += 1
        else:
            out.append((start, rows, None, None))
        start += rows
    return out


def delta(site) -> torch.Tensor:
    """ΔW (float32) of ``site``: rows of enabled block i are ``s·B_i@A_i``, others zero."""
    fan_in = math.prod(site.shape[1:])
    rows = [torch.zeros(n, fan_in) if a is None else site.scaling * (b @ a) for _, n, a, b in _pieces(site)]
    return torch.cat(rows).reshape(site.shape)


def factor_grads(site, grad_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dA, dL/dB)`` from ``dL/dW'`` (chain rule through ``W' = W + ΔW``)."""
    g = grad_w.detach().float().reshape(site.shape[0], -1)
    da, db = [], []
    for start, n, a, b in _pieces(site):
        if a is None:
            continue
        gi = g[start:start + n]
        da.append(site.scaling * b.t() @ gi)
        db.append(site.scaling * gi @ a.t())
    return torch.cat(da), torch.cat(db)
