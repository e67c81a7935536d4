"""Making adapters for a base weight: the factory the pipeline calls (:func:`new_adapter`), and the
weight-dependent initialisations, PiSSA factors and DoRA magnitudes.

All read the base weight ``W`` through :mod:`lora_fx.weights` (its logical shape, compute dtype and
dequantized value); PiSSA also writes the residual into ``W``, which lora_fx only allows on the
adapted module's *own copy* of the weights (``copy_weights=True``), never on the user's model, and
only for weight kinds that can be written (:func:`check_pissa`).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .. import weights
from ..config import LoraConfig
from ..errors import ConfigError, LoraFxWarning
from ..fused import resolve_blocks
from ..state import OWNS_WEIGHTS_ATTR, PISSA_BUFFERS, regions
from .module import LoraAdapter

__all__ = ["new_adapter", "check_pissa", "pissa_init_", "dora_init_"]


def new_adapter(site, weight: torch.Tensor, config: LoraConfig) -> LoraAdapter:
    """The adapter of ``config`` for one site (a :class:`~lora_fx.passes.find_sites.Consumer`) on
    base ``weight``: rank, alpha and fused blocks per the site's name, factors of the weight's
    logical shape in :meth:`LoraConfig.dtype_for`, on the weight's device, PiSSA / DoRA initialised.

    Warns:
        LoraFxWarning: the rank exceeds ``min(fan_out, fan_in)`` (the update is full-rank already).
    """
    shape = weights.logical_shape(weight)
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    r = config.rank_for(site.fqn)
    if r > min(fan_out, fan_in):
        warnings.warn(f"rank {r} for '{site.fqn}' exceeds min{(fan_out, fan_in)} of its weight {shape}: the update "
                      "is full-rank already and costs more than full fine-tuning of this weight. Use rank <= "
                      f"{min(fan_out, fan_in)} for it (e.g. rank_pattern={{'{site.fqn}': {min(fan_out, fan_in)}}}) "
                      "or exclude it", LoraFxWarning, stacklevel=6)  # the caller of transform / add_adapter
    blocks = resolve_blocks(config.fused_for(site.fqn, bool(site.blocks)), fan_out, site.blocks, site.fqn)
    a = LoraAdapter(shape, r, config.alpha_for(site.fqn), dtype=config.dtype_for(weight), device=weight.device,
                    dropout=float(config.dropout), use_rslora=config.use_rslora, init=config.init,
                    use_dora=config.use_dora, blocks=blocks)
    if config.init == "pissa":
        pissa_init_(a, weight)
    if config.use_dora:
        dora_init_(a, weight)
    return a


def check_pissa(root: nn.Module, consumers, chosen) -> None:
    """PiSSA rewrites ``W``: only allowed on the adapted module's own copy, on weight kinds that can
    be written, and when every use of ``W`` is adapted.

    Raises:
        ConfigError: naming the reason and the fix.
    """
    if not getattr(root, OWNS_WEIGHTS_ATTR, False):
        raise ConfigError(
            "init='pissa' writes the residual W - s·B@A into the base weight, but this adapted module "
            "shares its weights with your model (copy_weights=False), which lora_fx never modifies. "
            "Use copy_weights=True, or init='kaiming'/'gaussian'.")
    gms = dict(regions(root))
    for c in chosen:
        w = gms[c.gm_path].get_parameter(c.param)
        if not weights.writable(w):
            raise ConfigError(f"init='pissa' writes the residual W - s·B@A into '{c.fqn}', a "
                              f"{weights.kind_of(w).name} weight lora_fx cannot write; use init='kaiming' or "
                              "'gaussian' for it.")
    chosen_ids = {id(gms[c.gm_path].get_parameter(c.param)) for c in chosen}
    for c in consumers:
        if c not in chosen and id(gms[c.gm_path].get_parameter(c.param)) in chosen_ids:
            raise ConfigError(
                f"init='pissa' would change '{c.fqn}' (used by {c.op}), which shares its tensor with a "
                "targeted weight but is not targeted itself; target every alias of the weight or use "
                "init='kaiming'.")


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
        weight: the base parameter, logical shape ``adapter.weight_shape``; **modified in place**
            (:func:`lora_fx.weights.write_`).

    Returns:
        ``adapter``.
    """
    compute = torch.promote_types(weights.compute_dtype(weight), torch.float32)
    w = weights.dequantize(weight).detach().to(compute).reshape(adapter.weight_shape[0], -1)
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
    weights.write_(weight, residual.reshape(adapter.weight_shape))
    return adapter


@torch.no_grad()
def dora_init_(adapter: LoraAdapter, weight: torch.Tensor) -> LoraAdapter:
    """Set DoRA's magnitude to the row norms of the weight the adapter starts from:
    ``m[i] = ‖W[i] + s·(B@A)[i]‖₂`` (Liu et al., 2024, eq. 2; ``‖W[i]‖`` when ``B = 0``), so the
    adapted op is unchanged at init.

    Args:
        adapter: a :class:`~lora_fx.adapters.module.LoraAdapter` built with ``use_dora=True``.
        weight: the base weight, logical shape ``adapter.weight_shape``; read only.

    Returns:
        ``adapter``.
    """
    compute = torch.promote_types(weights.compute_dtype(weight), torch.float32)
    v = weights.dequantize(weight).detach().to(compute).reshape(adapter.weight_shape[0], -1)
    v = v + adapter.base_scaling * (adapter.lora_B.to(compute) @ adapter.lora_A.to(compute))
    adapter.lora_magnitude.copy_(torch.linalg.vector_norm(v, dim=1))
    return adapter
