"""Weight-dependent initialisation of adapters: PiSSA factors and DoRA magnitudes.

Both read the base weight ``W`` the adapter belongs to; PiSSA also writes the residual into ``W``,
which lora_fx only allows on the adapted module's *own copy* of the weights (``copy_weights=True``),
never on the user's model.
"""

from __future__ import annotations

import torch

from ..state import PISSA_BUFFERS
from .module import LoraAdapter

__all__ = ["pissa_init_", "dora_init_"]


@torch.no_grad()
def pissa_init_(adapter: LoraAdapter, weight: torch.Tensor) -> LoraAdapter:
    """PiSSA (Meng et al., NeurIPS 2024): principal singular vectors as the adapter, residual in ``W``.

    With ``W.reshape(out, -1) = U S Vᵀ`` (computed in float32 or wider) and ``s`` the adapter's
    base scaling::

        lora_A = sqrt(S_r) V_rᵀ / sqrt(s)      (rank, fan_in)
        lora_B = U_r sqrt(S_r) / sqrt(s)       (out, rank)
        W     ← W - s · lora_B @ lora_A        (in place, rounded once to W's dtype)

    so ``W_res + s·B@A == W`` up to one rounding of ``W_res``: the model is unchanged at init and
    folding gives ``W_res + s·B'@A' = W + (learned change)``.  Same factor split as HF PEFT's
    ``init_lora_weights="pissa"``.  The initial factors are kept as non-persistent buffers
    ``init_A`` / ``init_B`` so :func:`lora_fx.save_adapter` can express the adapter on the
    original ``W`` (rank ``2r``: ``[B, -B0] @ [A; A0]``, PEFT's PiSSA-to-LoRA conversion).

    Args:
        adapter: a fresh :class:`~lora_fx.adapters.module.LoraAdapter` for ``weight``.
        weight: the base parameter, shape ``adapter.weight_shape``; **modified in place**.

    Returns:
        ``adapter``.
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().to(compute).reshape(weight.shape[0], -1)
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    r = adapter.rank
    root = sv[:r].sqrt() / (adapter.base_scaling ** 0.5)
    a = root[:, None] * vh[:r]
    b = u[:, :r] * root[None, :]
    if r > sv.numel():  # rank above min(out, fan_in): the extra directions start at zero
        a = torch.cat([a, a.new_zeros(r - sv.numel(), a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], r - sv.numel())], dim=1)
    adapter.lora_A.copy_(a)
    adapter.lora_B.copy_(b)
    # the initial factors, so the adapter can be re-expressed on the original W (save_adapter)
    for name, factor in zip(PISSA_BUFFERS, (adapter.lora_A, adapter.lora_B)):
        adapter.register_buffer(name, factor.detach().clone(), persistent=False)
    residual = w - adapter.base_scaling * (b @ a)
    weight.copy_(residual.reshape(weight.shape).to(weight.dtype))
    return adapter


@torch.no_grad()
def dora_init_(adapter: LoraAdapter, weight: torch.Tensor) -> LoraAdapter:
    """Set DoRA's magnitude to the row norms of the weight the adapter starts from:
    ``m[i] = ‖W[i] + s·(B@A)[i]‖₂`` (Liu et al., 2024, eq. 2; ``‖W[i]‖`` when ``B = 0``), so the
    adapted op is unchanged at init.

    Args:
        adapter: a :class:`~lora_fx.adapters.module.LoraAdapter` built with ``use_dora=True``.
        weight: the base weight, shape ``adapter.weight_shape``; read only.

    Returns:
        ``adapter``.
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    v = weight.detach().to(compute).reshape(weight.shape[0], -1)
    v = v + adapter.base_scaling * (adapter.lora_B.to(compute) @ adapter.lora_A.to(compute))
    adapter.lora_magnitude.copy_(torch.linalg.vector_norm(v, dim=1))
    return adapter
