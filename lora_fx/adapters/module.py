"""The adapter module: one LoRA factor pair for one base parameter.

An adapter lives on the module that owns its base parameter, under
``<owner>.lora.<adapter_name>.<param_name>``, so the state-dict key of ``layers.0.fc.weight``'s
default adapter is ``layers.0.fc.lora.default.weight.lora_A``.  Nothing here touches the base
parameter; the graph reads the factors through ``get_attr`` nodes.
"""

from __future__ import annotations

import math

from typing import Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..errors import ConfigError
from ..state import ADAPTER_ATTR, adapter_path  # noqa: F401  (re-exported: old lora_fx.adapter names)

__all__ = ["LoraAdapter", "ADAPTER_ATTR", "adapter_path"]

class LoraAdapter(nn.Module):
    """Low-rank factors ``lora_A: (rank, fan_in)``, ``lora_B: (fan_out, rank)`` for a weight ``W``
    with ``fan_out = W.shape[0]``, ``fan_in = W[0].numel()``; ``ΔW = scaling · (B @ A).reshape(W.shape)``.

    ``scaling`` is a non-persistent 0-dim buffer (float32, or the factors' dtype when wider, so
    float64 adapters scale exactly) equal to ``alpha / rank`` (``alpha / sqrt(rank)``
    with ``use_rslora``; Kalajdzievski, 2023) times ``mix`` times ``[active and enabled]``;
    changing any of them refills the buffer in place (:meth:`refresh_scaling_`), so compiled
    graphs see the new value without recompiling.  Three independent pieces of switch state,
    each with one meaning and one writer:

    * ``active``: the adapter is in the model's active set (``set_active_adapters``,
      ``set_adapter_weights``, ``add_adapter(activate=...)``);
    * ``enabled``: the on/off switch (``enable_adapters_``, ``disable_adapters``), which never
      changes the active set;
    * ``mix``: the mixing weight (``set_scale_``, ``set_adapter_weights``; 1.0 by default).

    Args:
        weight_shape: shape of the base weight (at least 2-D).
        rank: ``r > 0``.
        alpha: ``alpha > 0``.
        dtype, device: of the factors.
        dropout: probability of LoRA dropout (``nn.Dropout`` submodule named ``dropout``; absent when 0).
        use_rslora: rank-stabilised scaling.
        init: ``"kaiming"`` (A ~ kaiming-uniform(a=√5) as in Hu et al.'s reference code, B = 0),
            ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or ``"pissa"`` (starts as kaiming; the factors
            are set from the weight by :func:`lora_fx.adapters.init.pissa_init_`).
        use_dora: add the DoRA magnitude ``lora_magnitude: (fan_out,)`` (Liu et al., 2024), set to
            the weight's row norms by :func:`lora_fx.adapters.init.dora_init_` (ones until then).
        blocks: fused weight (loralib's ``MergedLinear``; e.g. q, k, v packed in one weight):
            ``((name, rows, enabled), ...)`` splitting ``W.shape[0]`` in order.  Each enabled block
            ``i`` gets its own rank-``r`` pair ``A_i: (r, fan_in)``, ``B_i: (rows_i, r)``, stored
            stacked: ``lora_A: (n_enabled·r, fan_in)``, ``lora_B: (Σ enabled rows, r)``; ΔW's rows
            of block ``i`` are ``scaling · B_i @ A_i`` and disabled blocks' rows are exactly zero
            (:func:`lora_fx.ops.delta_weight`).  :meth:`block_factors` gives per-block views.

    Raises:
        ConfigError: ``blocks`` whose rows do not add up to ``W.shape[0]`` or that enable nothing;
            ``blocks`` together with ``use_dora`` or ``init="pissa"``.
    """

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        rank: int,
        alpha: float,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        dropout: float = 0.0,
        use_rslora: bool = False,
        init: str = "kaiming",
        blocks: Optional[Sequence[tuple[str, int, bool]]] = None,
        use_dora: bool = False,
    ) -> None:
        super().__init__()
        fan_out = int(weight_shape[0])
        fan_in = int(math.prod(weight_shape[1:]))
        self.weight_shape = tuple(int(s) for s in weight_shape)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.init = init
        self.mix = 1.0
        self.active = True
        self.enabled = True
        self.blocks = None if blocks is None else tuple((str(n), int(r), bool(on)) for n, r, on in blocks)
        a_rows, b_rows = self.rank, fan_out
        if self.blocks is not None:
            if sum(r for _, r, _ in self.blocks) != fan_out or any(r <= 0 for _, r, _ in self.blocks):
                raise ConfigError(f"fused blocks {self.blocks} must have positive sizes adding up to the "
                                  f"weight's {fan_out} output rows")
            if not any(on for _, _, on in self.blocks):
                raise ConfigError(f"fused blocks {self.blocks} enable no block; enable at least one")
            a_rows = self.rank * sum(1 for _, _, on in self.blocks if on)
            b_rows = sum(r for _, r, on in self.blocks if on)
        self.lora_A = nn.Parameter(torch.empty(a_rows, fan_in, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(b_rows, self.rank, dtype=dtype, device=device))
        self.use_dora = bool(use_dora)
        if self.blocks is not None and (self.use_dora or init == "pissa"):
            raise ConfigError("fused per-block adapters do not combine with DoRA or PiSSA; give the weight a "
                              "plain adapter with fused={pattern: None}")
        if self.use_dora:
            self.lora_magnitude = nn.Parameter(torch.ones(fan_out, dtype=dtype, device=device))
        self.register_buffer("scaling", torch.tensor(self.base_scaling, dtype=torch.promote_types(dtype, torch.float32),
                                                    device=device),
                             persistent=False)
        if self.use_dora:  # DoRA's graph also reads alpha / rank (its gate is scaling / base_scale)
            self.register_buffer("base_scale", self.scaling.clone(), persistent=False)
        if dropout > 0:
            self.dropout = nn.Dropout(dropout)
        self.reset_parameters()

    @property
    def base_scaling(self) -> float:
        """``alpha / rank`` (or ``alpha / sqrt(rank)`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    #: in the active set (class default: adapters pickled before this attribute existed are active)
    active = True

    @property
    def contributes(self) -> bool:
        """Whether the delta reaches the op: in the active set and switched on."""
        return bool(self.active and self.enabled)

    @property
    def effective_scaling(self) -> float:
        """The value the graph multiplies ``B @ A`` by: ``base_scaling · mix · [active and enabled]``."""
        return self.base_scaling * self.mix * (1.0 if self.contributes else 0.0)

    def refresh_scaling_(self) -> "LoraAdapter":
        """Write :attr:`effective_scaling` into the ``scaling`` buffer (and, for DoRA,
        :attr:`base_scaling` into ``base_scale``) in place."""
        with torch.no_grad():
            self.scaling.fill_(self.effective_scaling)
            if isinstance(getattr(self, "base_scale", None), torch.Tensor):
                self.base_scale.fill_(self.base_scaling)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-initialise: A per ``init``, B = 0 (so ``ΔW = 0`` and the model is unchanged)."""
        if self.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def layout(self) -> Optional[tuple[tuple[int, bool], ...]]:
        """``((rows, enabled), ...)`` of a fused adapter (the ``blocks`` argument of
        :mod:`lora_fx.ops`), or None for a plain adapter."""
        return None if self.blocks is None else tuple((r, on) for _, r, on in self.blocks)

    def block_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{block name: (A_i (r, fan_in), B_i (rows_i, r))}`` views of a fused adapter's enabled
        blocks (``{}`` for a plain adapter); ΔW's rows of block ``i`` are ``scaling · B_i @ A_i``."""
        out, b0, i = {}, 0, 0
        for name, rows, on in self.blocks or ():
            if on:
                out[name] = (self.lora_A[i * self.rank:(i + 1) * self.rank], self.lora_B[b0:b0 + rows])
                b0 += rows
                i += 1
        return out

    def delta_weight(self, *, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``ΔW`` of ``weight_shape`` (uses the current ``scaling``), in ``dtype`` or the factors'
        dtype; fused adapters give exact zeros on disabled blocks' rows."""
        a, b = self.lora_A, self.lora_B
        if dtype is not None:
            a, b = a.to(dtype), b.to(dtype)
        return ops.delta_weight(a, b, self.scaling.to(a.dtype), self.weight_shape, self.layout)

    def extra_repr(self) -> str:
        fused = "" if self.blocks is None else ", blocks=" + ",".join(
            f"{n}:{r}{'' if on else '(off)'}" for n, r, on in self.blocks)
        return (f"rank={self.rank}, alpha={self.alpha}, scaling={self.effective_scaling:g}, "
                f"weight_shape={self.weight_shape}{fused}" + (", dora=True" if self.use_dora else ""))
