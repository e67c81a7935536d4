"""Exact maps between loralib / LoRA-Torch factor layouts and lora_fx's ``(lora_A, lora_B)`` pair.

lora_fx's convention (:mod:`lora_fx.ops`): for a weight ``W`` with ``fan_out = W.shape[0]`` and
``fan_in = W[0].numel()``, ``A: (R, fan_in)``, ``B: (fan_out, R)``,
``ΔW = s·(B @ A).reshape(W.shape)``.  Each function below returns factors in one layout computing
*the same* ``ΔW`` as the other (no approximation: only transposes, block placement and zero padding).

Layouts of the seed libraries (``microsoft/LoRA`` ``loralib/layers.py``; ``Baijiong-Lin/LoRA-Torch``
``loratorch/layers.py``):

* ``Linear``: ``A (r, in)``, ``B (out, r)``: identical to ours.  With ``fan_in_fan_out=True`` the
  stored weight is ``(in, out)`` and ``ΔW_stored = (B @ A).T``: in our layout ``A' = Bᵀ``, ``B' = Aᵀ``.
* loralib ``Embedding``: ``A (r, num_embeddings)``, ``B (embedding_dim, r)``, ``ΔW = (B @ A).T``:
  ``A' = Bᵀ``, ``B' = Aᵀ`` (:func:`transposed`).  LoRA-Torch's ``Embedding`` stores ``w_lora_A (r, dim)``,
  ``w_lora_B (num, r)``: identical to ours.
* ``Conv`` (both): ``A (r·k, in·k^(d-1))``, ``B (out/groups·k, r·k)`` with
  ``ΔW = (B @ A).view(W.shape)``; its rank in our layout is up to ``r·k·k/groups``
  (:func:`conv_to_ours`, :func:`conv_from_ours`).
* ``MergedLinear``: ``A (r·n_on, in)``, ``B (out/n·n_on, r)`` used as a grouped ``conv1d`` weight: block
  ``e`` of the enabled output blocks gets ``B_e @ A_e``; disabled blocks get zero rows
  (:func:`merged_B`, :func:`merged_from_ours`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["transposed", "merged_B", "merged_from_ours", "conv_chunks", "conv_to_ours", "conv_from_ours",
           "pad_rank"]


def transposed(lora_A: Tensor, lora_B: Tensor) -> tuple[Tensor, Tensor]:
    """``(Bᵀ, Aᵀ)``: maps ``A (r, m), B (n, r)`` with ``ΔW = (B@A)ᵀ`` to a pair with ``ΔW = B'@A'``
    (and back: the map is its own inverse).  Views, so gradients flow."""
    return lora_B.t(), lora_A.t()


def merged_B(lora_B: Tensor, enable_lora: Sequence[bool], rank: int) -> Tensor:
    """loralib ``MergedLinear``'s grouped ``lora_B (d·n_on, r)`` as one ``(d·n, r·n_on)`` matrix
    ``B'`` with ``B' @ lora_A`` equal to loralib's zero-padded ``merge_AB()`` (block ``e`` of the
    enabled blocks: ``B_e @ A_e``; rows of disabled blocks: zero).  Out of place and differentiable.

    Args:
        lora_B: ``(d·n_on, r)``; ``enable_lora``: ``n`` flags, ``n_on`` of them true; ``rank``: ``r``.
    """
    n_on = sum(bool(e) for e in enable_lora)
    d = lora_B.shape[0] // n_on
    rows, e = [], 0
    for on in enable_lora:
        if on:
            rows.append(F.pad(lora_B[e * d:(e + 1) * d], (e * rank, (n_on - e - 1) * rank)))
            e += 1
        else:
            rows.append(lora_B.new_zeros(d, rank * n_on))
    return torch.cat(rows, 0)


def merged_from_ours(lora_A: Tensor, lora_B: Tensor, enable_lora: Sequence[bool]) -> tuple[Tensor, Tensor]:
    """Our pair ``A (R, in)``, ``B (out, R)`` as loralib ``MergedLinear`` factors of rank ``R``:
    ``A_l = [A; A; ...] (R·n_on, in)``, ``B_l = [B rows of each enabled block] (out/n·n_on, R)``.

    Exact only when the rows of disabled blocks of ``B @ A`` are zero; the caller checks."""
    n = len(enable_lora)
    d = lora_B.shape[0] // n
    on = [i for i, e in enumerate(enable_lora) if e]
    return torch.cat([lora_A] * len(on), 0), torch.cat([lora_B[i * d:(i + 1) * d] for i in on], 0)


def conv_chunks(weight_shape: Sequence[int], kernel: int, groups: int) -> int:
    """``m = k / groups``: how many rows of loralib's ``B @ A`` (length ``in·k^(d-1)``) make one row of
    ``W`` (length ``in/groups·k^d``).  Returns 0 when ``groups`` does not divide ``k`` (no row-aligned
    exact map exists)."""
    return kernel // groups if kernel % groups == 0 else 0


def conv_to_ours(lora_A: Tensor, lora_B: Tensor, weight_shape: Sequence[int], kernel: int,
                 groups: int) -> tuple[Tensor, Tensor]:
    """loralib conv factors ``A (r·k, Q)``, ``B (out·m, r·k)`` (``Q = in·k^(d-1)``, ``m = k/groups``)
    as our pair of rank ``m·r·k``: row ``i`` of ``ΔW`` is ``concat_j B[i·m+j] @ A``, so
    ``B' = B.reshape(out, m·r·k)`` and ``A' = block_diag(A, ..., A)`` (``m`` copies).

    Raises:
        ValueError: ``groups`` does not divide ``k`` (the caller names the key).
    """
    m = conv_chunks(weight_shape, kernel, groups)
    if m == 0:
        raise ValueError(f"groups={groups} does not divide kernel size {kernel}")
    out = int(weight_shape[0])
    return torch.block_diag(*([lora_A] * m)), lora_B.reshape(out, m * lora_B.shape[1])


def conv_from_ours(lora_A: Tensor, lora_B: Tensor, weight_shape: Sequence[int], kernel: int,
                   groups: int) -> tuple[Tensor, Tensor, int]:
    """Our pair ``A (R, L)``, ``B (out, R)`` as loralib conv factors ``(A_l, B_l, r_l)`` with
    ``r_l = ceil(m·R / k)``, ``A_l (r_l·k, Q)``, ``B_l (out·m, r_l·k)`` (zero padded beyond ``m·R``):
    chunk ``j`` of row ``i`` of ``ΔW`` is ``B[i] @ A[:, jQ:(j+1)Q]``.

    Raises:
        ValueError: ``groups`` does not divide ``k``.
    """
    m = conv_chunks(weight_shape, kernel, groups)
    if m == 0:
        raise ValueError(f"groups={groups} does not divide kernel size {kernel}")
    R, L = lora_A.shape
    out = lora_B.shape[0]
    Q = L // m
    a = lora_A.reshape(R, m, Q).permute(1, 0, 2).reshape(m * R, Q)
    eye = torch.eye(m, dtype=lora_B.dtype, device=lora_B.device)
    b = torch.einsum("ir,jk->ijkr", lora_B, eye).reshape(out * m, m * R)
    r_l = max(1, math.ceil(m * R / kernel))
    a, b = pad_rank(a, b, r_l * kernel)
    return a, b, r_l


def pad_rank(lora_A: Tensor, lora_B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad a pair ``A (R, ·)``, ``B (·, R)`` to rank ``rank ≥ R`` (same ``B @ A``)."""
    extra = rank - lora_A.shape[0]
    if extra <= 0:
        return lora_A, lora_B
    return F.pad(lora_A, (0, 0, 0, extra)), F.pad(lora_B, (0, extra))
