"""loralib / LoRA-Torch layer classes on lora_fx's math.

Each class subclasses its ``torch.nn`` counterpart (``isinstance``, pretrained ``load_state_dict``,
``.to()``, DDP and FSDP keep working), takes loralib's constructor arguments and holds loralib's
parameter names and layouts (``lora_A``, ``lora_B``; LoRA-Torch's ``<name>_lora_A`` for
``MultiheadAttention``), so a loralib checkpoint loads as it is.  The forward calls the functions
of :mod:`lora_fx.ops` that the compiler pass inserts (``linear_delta``, ``embedding_delta``,
``merge``, ``module_call``): there is no second implementation of the LoRA math.

Differences from loralib, on purpose:

* ``train()`` / ``eval()`` never write the base weight (loralib adds ``ΔW`` into ``weight.data`` on
  ``eval()`` and subtracts it on ``train()``, in place on a tensor autograd may have saved).  Here the
  same computation runs in both modes, so outputs are bit-identical across mode switches;
  ``merge_weights`` is accepted and recorded, ``merged`` stays False.  Use :func:`lora_fx.nn.merged_weight`
  to read ``W + ΔW`` out of place.
* ``Conv1d`` / ``Conv3d`` work for any kernel size (loralib's view fails unless ``k == 1``; where it
  works the layouts coincide); loralib ignores ``lora_dropout`` in convolutions, and so does this.
* ``MultiheadAttention`` follows LoRA-Torch's signature and keys, but a block of the fused
  ``in_proj_weight`` left out of ``enable_lora`` gets no update (LoRA-Torch trains it anyway).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .. import ops
from ..errors import AdapterMismatchError, ConfigError
from ..state import LEAF_ATTR
from . import layout

__all__ = ["LoRALayer", "Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "MergedLinear",
           "MultiheadAttention", "merged_weight"]


class LoRALayer:
    """Mixin holding loralib's attributes: ``r``, ``lora_alpha``, ``scaling = lora_alpha / r``,
    ``lora_dropout`` (an ``nn.Dropout`` or ``nn.Identity``), ``merged`` (always False here) and
    ``merge_weights``.  Checkpoint keys written by LoRA-Torch (``w_lora_A`` / ``w_lora_B``) are
    accepted by ``load_state_dict`` and mapped to this class's layout."""

    def _lora_init(self, r: int, lora_alpha: float, lora_dropout: float, merge_weights: bool) -> None:
        if not isinstance(r, int) or r < 0:
            raise ConfigError(f"{type(self).__name__}: r must be an int >= 0, got {r!r}")
        if not 0.0 <= float(lora_dropout) < 1.0:
            raise ConfigError(f"{type(self).__name__}: lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.merge_weights = merge_weights
        if r > 0:
            self.scaling = self.lora_alpha / self.r

    # LoRA-Torch key -> (our key, transform of the tensor)
    def _lora_aliases(self) -> dict[str, tuple[str, bool]]:
        return {"w_lora_A": ("lora_A", False), "w_lora_B": ("lora_B", False)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        aliases = self._lora_aliases()
        staged = {}
        for theirs, (ours, transpose) in aliases.items():
            if prefix + theirs in state_dict and prefix + ours not in state_dict:
                staged[theirs] = (ours, transpose, state_dict.pop(prefix + theirs))
        for theirs, (ours, transpose, value) in staged.items():
            if transpose:  # LoRA-Torch Embedding: w_lora_A (r, dim) -> lora_B (dim, r), ...
                value = value.t()
            state_dict[prefix + ours] = value
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# lora_fx.transform keeps these layers opaque (a call_module node; see lora_fx.nn.rule)
setattr(LoRALayer, LEAF_ATTR, True)


def _init_A(p: Tensor) -> None:
    nn.init.kaiming_uniform_(p, a=math.sqrt(5))  # as nn.Linear's weight (Hu et al.'s reference code)


class Linear(LoRALayer, nn.Linear):
    """``y = x Wᵀ + b + s·dropout(x) Aᵀ Bᵀ`` (loralib ``Linear``; :func:`lora_fx.ops.linear_delta`).

    Args:
        in_features, out_features, **kwargs: as ``nn.Linear`` (``bias``, ``device``, ``dtype``).
        r: rank (0: a plain ``nn.Linear`` with loralib's attributes).
        lora_alpha: ``scaling = lora_alpha / r``.
        lora_dropout: dropout on the input of the LoRA branch.
        fan_in_fan_out: the weight is stored ``(in, out)`` (GPT-2 ``Conv1D`` checkpoints).
        merge_weights: accepted for loralib compatibility; the weight is never merged in place.

    Parameters: ``lora_A (r, in_features)``, ``lora_B (out_features, r)``; ``weight`` frozen when ``r > 0``.

    Raises:
        ConfigError: ``r < 0`` or ``lora_dropout`` outside ``[0, 1)``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, fan_in_fan_out: bool = False, merge_weights: bool = True,
                 **kwargs) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._lora_init(r, lora_alpha, lora_dropout, merge_weights)
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features, r)))
            self.weight.requires_grad = False
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight = nn.Parameter(self.weight.detach().t().contiguous(), requires_grad=self.weight.requires_grad)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init for ``weight``/``bias``; ``lora_A`` kaiming-uniform, ``lora_B = 0``."""
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            _init_A(self.lora_A)
            nn.init.zeros_(self.lora_B)

    def _weight(self) -> Tensor:
        return self.weight.t() if self.fan_in_fan_out else self.weight

    def lora_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"weight": (A, B)}`` in lora_fx's layout for the stored weight (``ΔW = s·B@A``)."""
        if self.r == 0:
            return {}
        if self.fan_in_fan_out:
            return {"weight": layout.transposed(self.lora_A, self.lora_B)}
        return {"weight": (self.lora_A, self.lora_B)}

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self._weight(), self.bias)
        if self.r > 0:
            y = ops.linear_delta(y, self.lora_dropout(x), self.lora_A, self.lora_B, self.scaling)
        return y


class Embedding(LoRALayer, nn.Embedding):
    """``y = W[idx] + s·(Aᵀ[idx]) Bᵀ`` (loralib ``Embedding``; :func:`lora_fx.ops.embedding_delta`).

    Parameters (loralib's layout): ``lora_A (r, num_embeddings)`` (initialised to zero),
    ``lora_B (embedding_dim, r)`` (normal), so ``ΔW = s·(B @ A)ᵀ``.  LoRA-Torch checkpoints
    (``w_lora_A (r, dim)``, ``w_lora_B (num, r)``) load transposed into these.  With ``max_norm`` set
    the merged weight is used instead (:func:`lora_fx.ops.merge`), renormalised out of place.

    Raises:
        ConfigError: ``r < 0``.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, r: int = 0, lora_alpha: float = 1,
                 merge_weights: bool = True, **kwargs) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._lora_init(r, lora_alpha, 0.0, merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r, num_embeddings)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((embedding_dim, r)))
            self.weight.requires_grad = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Embedding``'s init; ``lora_A = 0``, ``lora_B ~ N(0, 1)`` (loralib's choice)."""
        nn.Embedding.reset_parameters(self)
        if hasattr(self, "lora_A"):
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def _lora_aliases(self):
        return {"w_lora_A": ("lora_B", True), "w_lora_B": ("lora_A", True)}

    def lora_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"weight": (lora_Bᵀ (r, dim), lora_Aᵀ (num, r))}``: lora_fx's layout."""
        return {"weight": layout.transposed(self.lora_A, self.lora_B)} if self.r > 0 else {}

    def forward(self, x: Tensor) -> Tensor:
        if self.r == 0:
            return nn.Embedding.forward(self, x)
        a, b = layout.transposed(self.lora_A, self.lora_B)
        if self.max_norm is not None:
            w = ops.merge(self.weight, a, b, self.scaling)
            return F.embedding(x, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                               self.sparse)
        y = nn.Embedding.forward(self, x)
        return ops.embedding_delta(y, x, a, b, self.scaling, self.padding_idx, self.scale_grad_by_freq)


def _int_kernel(cls: str, kernel_size) -> int:
    ks = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    if not ks or any(k != ks[0] for k in ks) or not isinstance(ks[0], int):
        raise ConfigError(f"lora_fx.nn.{cls}: kernel_size must be one int (loralib's layout needs a cubic "
                          f"kernel), got {kernel_size!r}; for other kernels use lora_fx.transform on an "
                          f"nn.{cls}")
    return ks[0]


class _ConvLoRA(LoRALayer):
    """Convolution with ``weight_eff = W + s·(B @ A).view(W.shape)`` (loralib ``ConvLoRA``;
    :func:`lora_fx.ops.merge`).

    Parameters: ``lora_A (r·k, in_channels·k^(d-1))``, ``lora_B (out_channels/groups·k, r·k)``;
    for ``Conv2d`` exactly loralib's and LoRA-Torch's shapes (for ``Conv1d``/``Conv3d`` they agree
    with loralib's where loralib runs, ``k == 1``).  loralib wraps an inner ``conv``; here the class
    *is* the ``nn.ConvNd`` (``self.conv`` returns ``self``), and checkpoints with ``conv.weight`` /
    ``conv.bias`` keys load into ``weight`` / ``bias``.
    """

    _nd = 2

    def _conv_lora_init(self, in_channels, out_channels, kernel_size, r, lora_alpha, lora_dropout,
                        merge_weights):
        k = _int_kernel(type(self).__name__, kernel_size)
        self._lora_init(r, lora_alpha, lora_dropout, merge_weights)
        if r > 0:
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * k, in_channels * k ** (self._nd - 1))))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_channels // self.groups * k, r * k)))
            self.weight.requires_grad = False
        self.reset_parameters()

    @property
    def conv(self):
        """loralib's inner convolution: this module itself."""
        return self

    def reset_parameters(self) -> None:
        """The convolution's init; ``lora_A`` kaiming-uniform, ``lora_B = 0``."""
        nn.modules.conv._ConvNd.reset_parameters(self)
        if hasattr(self, "lora_A"):
            _init_A(self.lora_A)
            nn.init.zeros_(self.lora_B)

    def _lora_aliases(self):
        return {"w_lora_A": ("lora_A", False), "w_lora_B": ("lora_B", False)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("weight", "bias"):
            if prefix + "conv." + name in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + "conv." + name)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lora_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"weight": (A', B')}`` in lora_fx's layout (rank ``r·k·k/groups``); raises
        ``ConfigError`` when ``groups`` does not divide ``k``."""
        if self.r == 0:
            return {}
        k = self.kernel_size[0]
        try:
            return {"weight": layout.conv_to_ours(self.lora_A, self.lora_B, self.weight.shape, k, self.groups)}
        except ValueError as exc:
            raise ConfigError(f"{type(self).__name__}: {exc}: no exact lora_fx layout") from exc

    def forward(self, x: Tensor) -> Tensor:
        if self.r == 0:
            return self._conv_forward(x, self.weight, self.bias)
        return self._conv_forward(x, ops.merge(self.weight, self.lora_A, self.lora_B, self.scaling), self.bias)


class Conv1d(_ConvLoRA, nn.Conv1d):
    """``nn.Conv1d`` with LoRA (see :class:`_ConvLoRA` for the math and layout).

    Args: ``in_channels, out_channels, kernel_size`` (int), ``r=0, lora_alpha=1, lora_dropout=0.0``
    (ignored, as in loralib), ``merge_weights=True``, ``**kwargs`` of ``nn.Conv1d``.

    Raises:
        ConfigError: ``kernel_size`` not one int, ``r < 0``.
    """

    _nd = 1

    def __init__(self, in_channels, out_channels, kernel_size, r=0, lora_alpha=1, lora_dropout=0.0,
                 merge_weights=True, **kwargs):
        nn.Conv1d.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._conv_lora_init(in_channels, out_channels, kernel_size, r, lora_alpha, lora_dropout, merge_weights)


class Conv2d(_ConvLoRA, nn.Conv2d):
    """``nn.Conv2d`` with LoRA, loralib's ``Conv2d`` layout (see :class:`_ConvLoRA`).

    Raises:
        ConfigError: ``kernel_size`` not one int, ``r < 0``.
    """

    _nd = 2

    def __init__(self, in_channels, out_channels, kernel_size, r=0, lora_alpha=1, lora_dropout=0.0,
                 merge_weights=True, **kwargs):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._conv_lora_init(in_channels, out_channels, kernel_size, r, lora_alpha, lora_dropout, merge_weights)


class Conv3d(_ConvLoRA, nn.Conv3d):
    """``nn.Conv3d`` with LoRA (see :class:`_ConvLoRA`).

    Raises:
        ConfigError: ``kernel_size`` not one int, ``r < 0``.
    """

    _nd = 3

    def __init__(self, in_channels, out_channels, kernel_size, r=0, lora_alpha=1, lora_dropout=0.0,
                 merge_weights=True, **kwargs):
        nn.Conv3d.__init__(self, in_channels, out_channels, kernel_size, **kwargs)
        self._conv_lora_init(in_channels, out_channels, kernel_size, r, lora_alpha, lora_dropout, merge_weights)


class MergedLinear(LoRALayer, nn.Linear):
    """A fused projection (e.g. ``qkv``) with LoRA on the enabled output blocks (loralib
    ``MergedLinear``): ``y = x Wᵀ + b + s·dropout(x) Aᵀ B'ᵀ`` where ``B' = merged_B(lora_B)`` places
    block ``e``'s ``B_e`` against ``A_e`` and zero rows for disabled blocks
    (:func:`lora_fx.nn.layout.merged_B`, :func:`lora_fx.ops.linear_delta`).

    Args:
        enable_lora: one flag per equal output block, e.g. ``[True, False, True]`` for q and v.
        others: as :class:`Linear`.

    Parameters: ``lora_A (r·n_on, in)``, ``lora_B (out/n·n_on, r)`` (loralib's grouped layout).

    Raises:
        ConfigError: ``len(enable_lora)`` does not divide ``out_features``; ``r < 0``.
    """

    def __init__(self, in_features: int, out_features: int, r: int = 0, lora_alpha: float = 1,
                 lora_dropout: float = 0.0, enable_lora: Sequence[bool] = (False,), fan_in_fan_out: bool = False,
                 merge_weights: bool = True, **kwargs) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self._lora_init(r, lora_alpha, lora_dropout, merge_weights)
        enable_lora = [bool(e) for e in enable_lora]
        if not enable_lora or out_features % len(enable_lora):
            raise ConfigError(f"MergedLinear: len(enable_lora)={len(enable_lora)} must divide "
                              f"out_features={out_features}")
        self.enable_lora = enable_lora
        self.fan_in_fan_out = fan_in_fan_out
        if r > 0 and any(enable_lora):
            n_on = sum(enable_lora)
            self.lora_A = nn.Parameter(self.weight.new_zeros((r * n_on, in_features)))
            self.lora_B = nn.Parameter(self.weight.new_zeros((out_features // len(enable_lora) * n_on, r)))
            self.weight.requires_grad = False
            ind = torch.zeros(len(enable_lora), out_features // len(enable_lora), dtype=torch.bool)
            ind[torch.tensor(enable_lora)] = True
            self.lora_ind = ind.view(-1)
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight = nn.Parameter(self.weight.detach().t().contiguous(), requires_grad=self.weight.requires_grad)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init; ``lora_A`` kaiming-uniform, ``lora_B = 0``."""
        nn.Linear.reset_parameters(self)
        if hasattr(self, "lora_A"):
            _init_A(self.lora_A)
            nn.init.zeros_(self.lora_B)

    def lora_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{"weight": (lora_A, merged_B(lora_B))}`` in lora_fx's layout (rank ``r·n_on``)."""
        if not hasattr(self, "lora_A"):
            return {}
        a, b = self.lora_A, layout.merged_B(self.lora_B, self.enable_lora, self.r)
        return {"weight": layout.transposed(a, b) if self.fan_in_fan_out else (a, b)}

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight.t() if self.fan_in_fan_out else self.weight, self.bias)
        if hasattr(self, "lora_A"):
            b = layout.merged_B(self.lora_B, self.enable_lora, self.r)
            y = ops.linear_delta(y, self.lora_dropout(x), self.lora_A, b, self.scaling)
        return y


class MultiheadAttention(LoRALayer, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with LoRA on its projections (LoRA-Torch's ``MultiheadAttention``):
    the module runs with ``W + s·B@A`` substituted for each adapted weight
    (:func:`lora_fx.ops.merge` + :func:`lora_fx.ops.module_call`, as the pass lowers an MHA site).

    Args:
        embed_dim, num_heads, **kwargs: as ``nn.MultiheadAttention`` (``batch_first``, ``kdim``, ...).
        enable_lora: subset of ``["q", "k", "v", "o"]``.
        r, lora_alpha: rank and ``scaling = lora_alpha / r``.

    Parameters (LoRA-Torch's names and shapes): with a fused ``in_proj_weight (3E, E)``,
    ``<qkv>_lora_A (r, E)`` and ``<qkv>_lora_B (3E, r)`` where ``<qkv>`` joins the enabled letters
    (``qkv``, ``qv``, ...); rows of blocks not enabled get no update.  With separate
    ``q/k/v_proj_weight``: ``q_lora_A (r, E)``, ``k_lora_A (r, kdim)``, ``v_lora_A (r, vdim)``,
    ``*_lora_B (E, r)``.  ``"o"``: ``o_lora_A (r, E)``, ``o_lora_B (E, r)`` on ``out_proj.weight``.

    Raises:
        ConfigError: unknown letters in ``enable_lora``; ``r < 0``.
        AdapterMismatchError: loading a fused ``lora_B`` with non-zero rows for a disabled block.
    """

    def __init__(self, embed_dim: int, num_heads: int, enable_lora: Sequence[str] = ("q", "k", "v", "o"),
                 r: int = 0, lora_alpha: float = 1, merge_weights: bool = True, **kwargs) -> None:
        nn.MultiheadAttention.__init__(self, embed_dim, num_heads, **kwargs)
        self._lora_init(r, lora_alpha, 0.0, merge_weights)
        bad = [e for e in enable_lora if e not in ("q", "k", "v", "o")]
        if bad:
            raise ConfigError(f"MultiheadAttention: enable_lora entries must be 'q', 'k', 'v' or 'o', got {bad}")
        self.enable_lora = [e for e in ("q", "k", "v", "o") if e in enable_lora]
        self._lora_bypass = False
        #: base parameter name -> LoRA-Torch's lora name
        self.params_with_lora: dict[str, str] = {}
        if r > 0:
            qkv = [n for n in ("q", "k", "v") if n in self.enable_lora]
            if self._qkv_same_embed_dim:
                if qkv:
                    self.params_with_lora["in_proj_weight"] = "".join(qkv)
            else:
                for n in qkv:
                    self.params_with_lora[f"{n}_proj_weight"] = n
            if "o" in self.enable_lora:
                self.params_with_lora["out_proj.weight"] = "o"
            for pname, lname in self.params_with_lora.items():
                w = self.get_parameter(pname)
                self.register_parameter(f"{lname}_lora_A", nn.Parameter(w.new_zeros((r, w.shape[1]))))
                self.register_parameter(f"{lname}_lora_B", nn.Parameter(w.new_zeros((w.shape[0], r))))
                w.requires_grad = False
                _init_A(getattr(self, f"{lname}_lora_A"))

    def _lora_aliases(self):
        return {}

    def _row_mask(self, pname: str, like: Tensor) -> Optional[Tensor]:
        if pname != "in_proj_weight" or len(self.params_with_lora[pname]) == 3:
            return None
        on = [n in self.enable_lora for n in ("q", "k", "v")]
        return torch.tensor(on, dtype=like.dtype, device=like.device).repeat_interleave(self.embed_dim)[:, None]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        name = self.params_with_lora.get("in_proj_weight")
        key = f"{prefix}{name}_lora_B"
        if name is not None and key in state_dict:
            mask = self._row_mask("in_proj_weight", state_dict[key])
            if mask is not None and bool((state_dict[key] * (1 - mask)).any()):
                raise AdapterMismatchError(
                    f"'{key}' has non-zero rows for the in_proj blocks not in enable_lora={self.enable_lora} "
                    "(LoRA-Torch trains them anyway). Build the layer with enable_lora=['q', 'k', 'v', 'o'] "
                    "to load it exactly.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lora_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{base parameter name: (A, B)}`` in lora_fx's layout (disabled in_proj blocks zeroed)."""
        out = {}
        for pname, lname in self.params_with_lora.items():
            a, b = getattr(self, f"{lname}_lora_A"), getattr(self, f"{lname}_lora_B")
            mask = self._row_mask(pname, b)
            out[pname] = (a, b if mask is None else b * mask)
        return out

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs):
        if self._lora_bypass or not self.params_with_lora:
            return nn.MultiheadAttention.forward(self, query, key, value, *args, **kwargs)
        merged = {p: ops.merge(self.get_parameter(p), a, b, self.scaling) for p, (a, b) in self.lora_factors().items()}
        self._lora_bypass = True
        try:
            return ops.module_call(self, merged, query, key, value, *args, **kwargs)
        finally:
            self._lora_bypass = False


def merged_weight(layer: nn.Module, name: str = "weight") -> Tensor:
    """``W + s·ΔW`` of one adapted weight of a :mod:`lora_fx.nn` layer, out of place
    (:func:`lora_fx.ops.merge`); what loralib writes into ``weight.data`` on ``eval()``.

    Raises:
        ConfigError: ``layer`` has no adapter on ``name``.
    """
    factors = layer.lora_factors() if isinstance(layer, LoRALayer) else {}
    if name not in factors:
        raise ConfigError(f"{type(layer).__name__} has no LoRA adapter on '{name}'; adapted: {sorted(factors)}")
    a, b = factors[name]
    return ops.merge(layer.get_parameter(name), a, b, layer.scaling)
