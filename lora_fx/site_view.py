"""The public view of an adapted model: one :class:`Site` per adapted base parameter and adapter.

A site is read from the records of :mod:`lora_fx.state` and from the adapter module on access, so
it stays true after hot-swaps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .state import adapter_records, plain_name, require_adapted, unwrap

if TYPE_CHECKING:  # annotations only: the adapter module imports the state module
    from .adapters.module import LoraAdapter

__all__ = ["Site", "sites"]

@dataclass(frozen=True)
class Site:
    """One adapted base parameter (per adapter name).  The adapter's values are read from
    ``module`` on access, so a site stays true after hot-swaps (:func:`lora_fx.load_adapter_values_`,
    :func:`lora_fx.reserve_rank_`, :func:`lora_fx.set_scale_`).

    Attributes:
        param: fully qualified name of the base parameter (first targeted alias).
        aliases: every targeted name of that parameter object.
        adapter: adapter name.
        op: op kind of the first consuming call (``"linear"``, ``"conv2d"``, ``"embedding"``,
            ``"matmul"``, ``"mha"``, ...); ``ops`` lists every consumer's kind and ``lowerings``
            each consumer's lowering (``"factored"`` or ``"merge"``).
        path: fully qualified module path of the :class:`~lora_fx.adapters.module.LoraAdapter`.
        module: that adapter module.
        shape: base weight shape (the ``(out, in...)`` shape its op consumes).
        rank, alpha, scaling: ``scaling = alpha / rank`` (``/ sqrt(rank)`` for rsLoRA), times the
            adapter's mixing weight, 0 when disabled.
        lora_A: ``nn.Parameter (rank, shape[1:].numel())``; lora_B: ``(shape[0], rank)``
            (fused: ``(n_enabled·rank, ...)`` and ``(Σ enabled rows, rank)``, see ``blocks``).
        blocks: fused weight: ``((block name, rows, enabled), ...)`` over ``shape[0]``; ``()``
            for a plain adapter.  ``module.block_factors()`` gives per-block ``(A_i, B_i)``.
    """

    param: str
    aliases: tuple[str, ...]
    adapter: str
    op: str
    ops: tuple[str, ...]
    lowering: str
    lowerings: tuple[str, ...]
    path: str
    module: "LoraAdapter"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.module.weight_shape

    @property
    def rank(self) -> int:
        return self.module.rank

    @property
    def alpha(self) -> float:
        return self.module.alpha

    @property
    def scaling(self) -> float:
        return self.module.effective_scaling

    @property
    def lora_A(self) -> torch.nn.Parameter:
        return self.module.lora_A

    @property
    def lora_B(self) -> torch.nn.Parameter:
        return self.module.lora_B

    @property
    def blocks(self) -> tuple[tuple[str, int, bool], ...]:
        return tuple(self.module.blocks or ())


def sites(gm: nn.Module) -> list[Site]:
    """One :class:`Site` per adapted base parameter and adapter, in graph order.

    Raises:
        NotAdaptedError: ``gm`` carries no lora_fx adapters.
    """
    require_adapted(gm, "sites")
    gm = unwrap(gm)  # names as in the plain module, compiled or wrapped in DDP
    # one adapter may be reached from several GraphModules (a weight shared by two blocks):
    # one Site with every alias and consumer
    found: dict[tuple[int, str], list] = {}
    for prefix, path, rec, a in adapter_records(gm):
        prefix, path = plain_name(prefix), plain_name(path)
        entry = found.setdefault((id(a), rec.adapter), [prefix + rec.param, path, rec.adapter, a, [], []])
        entry[4].extend(prefix + x for x in rec.aliases if prefix + x not in entry[4])
        entry[5].extend(rec.consumers)
    out = []
    for param, path, name, a, aliases, consumers in found.values():
        ops_ = tuple(op for _, op, _ in consumers)
        lows = tuple(low for _, _, low in consumers)
        out.append(Site(param=param, aliases=tuple(aliases), adapter=name, op=ops_[0] if ops_ else "", ops=ops_,
                        lowering=lows[0] if len(set(lows)) == 1 else "+".join(lows), lowerings=lows,
                        path=path, module=a))
    return out
