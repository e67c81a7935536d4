"""A lean, exact dequantization of torchao's ``NF4Tensor`` (QLoRA's 4-bit NormalFloat, Dettmers et
al., 2023, §3).

An ``NF4Tensor`` holds two 4-bit codes per byte (``quantized_data``, uint8, high nibble first),
one scale per block of ``block_size`` values, itself quantized to int8 per block of
``scaler_block_size`` scales (``quantized_scalers``, ``quantization_factor``, ``scaler_mean``), and
the 16-entry code book ``nf4``.  torchao's ``get_original_weight()`` unpacks the codes into int64
indices (a transient about 7× the bf16 weight); :func:`dequantize_nf4` indexes a 256-entry table
of code *pairs* with the packed bytes directly and scales in place (about 2× the weight), with
bit-for-bit the same result.  It uses only public attributes of the tensor and its own
``dequantize_scalers``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["dequantize_nf4"]


def dequantize_nf4(w: Tensor) -> Tensor:
    """The float weight an ``NF4Tensor`` stands for, bitwise equal to ``w.get_original_weight()``.

    Args:
        w: a ``torchao.quantization.NF4Tensor`` of logical shape ``(out, in)``.

    Returns:
        a plain tensor of ``w.shape`` and ``w.dtype``: ``nf4[code] · scale[block]``.
    """
    scalers = w.dequantize_scalers(w.quantized_scalers, w.quantization_factor, w.scaler_block_size)
    # byte b holds codes (b >> 4, b & 15): row b of the table is (nf4[b >> 4], nf4[b & 15])
    pairs = torch.stack([w.nf4.repeat_interleave(16), w.nf4.repeat(16)], dim=1)
    out = pairs.index_select(0, w.quantized_data.to(torch.int32)).view(-1, w.block_size)
    out.mul_(scalers.unsqueeze(-1))
    return out.view(w.shape)
