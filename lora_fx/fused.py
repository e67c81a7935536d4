"""Fused projections: one weight whose output rows are several blocks (q, k, v packed in one
``Linear``; ``nn.MultiheadAttention.in_proj_weight``; gate/up packed MLPs).

A fused adapter gives each *enabled* block its own rank-``r`` factors and leaves the rows of the
other blocks exactly unchanged (loralib's ``MergedLinear(enable_lora=[True, False, True])``, with
the delta placed on the **output rows** of each block).  Block sizes are whatever the user says;
nothing is assumed to divide by three unless the user asks for an equal split.

Configure with ``transform(..., fused={pattern: spec})`` (or ``LoraConfig(fused=...)``), where a
``spec`` is a :class:`FusedSpec`, or a shortcut for one:

* ``{"blocks": {"q": 64, "k": 16, "v": 16}, "enable": ("q", "v")}``: named sizes (in row order);
* ``{"blocks": ("q", "k", "v")}``: equal split (the row count must divide);
* ``("q", "k", "v")``: the same, every block enabled;
* ``{"enable": ("q", "v")}``: the op's own blocks (``nn.MultiheadAttention.in_proj_weight`` and
  ``F.multi_head_attention_forward``'s ``in_proj_weight`` are ``q, k, v`` of ``embed_dim`` rows
  each, and are fused by default);
* ``None``: a plain (unfused) adapter, also for MHA's ``in_proj_weight``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError

__all__ = ["FusedSpec", "resolve_blocks"]


@dataclass(frozen=True)
class FusedSpec:
    """Block layout of a fused weight's output rows.

    Attributes:
        blocks: ``((name, rows), ...)`` in row order; ``rows`` may be None for all blocks (equal
            split); ``()`` means the op's default blocks (MHA: ``q, k, v``).
        enable: names of the blocks that get an adapter; None: all of them.
    """

    blocks: tuple[tuple[str, Optional[int]], ...] = ()
    enable: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        names = [n for n, _ in self.blocks]
        if len(set(names)) != len(names):
            raise ConfigError(f"fused block names must be unique, got {names}")
        sizes = [r for _, r in self.blocks]
        if any(r is None for r in sizes) and any(r is not None for r in sizes):
            raise ConfigError(f"fused blocks {self.blocks}: give every block's size or none (equal split)")
        if any(r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0) for r in sizes):
            raise ConfigError(f"fused block sizes must be positive ints, got {self.blocks}")
        if self.enable is not None and names:
            unknown = [e for e in self.enable if e not in names]
            if unknown:
                raise ConfigError(f"fused enable names {unknown} are not blocks; blocks are {names}")

    @classmethod
    def coerce(cls, value: Any, where: str = "fused") -> Optional["FusedSpec"]:
        """A :class:`FusedSpec` from any accepted shortcut (see the module docstring); ``None`` and
        ``False`` give None (plain adapter).

        Raises:
            ConfigError: anything else, naming ``where``.
        """
        if value is None or value is False:
            return None
        if isinstance(value, FusedSpec):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"blocks", "enable"})
            if unknown:
                raise ConfigError(f"{where}: unknown key(s) {unknown}; a fused spec has 'blocks' and 'enable'")
            enable = value.get("enable")
            if isinstance(enable, str):
                enable = (enable,)
            return cls(blocks=_blocks(value.get("blocks", ()), where),
                       enable=None if enable is None else tuple(str(e) for e in enable))
        if isinstance(value, str):
            raise ConfigError(f"{where}: a fused spec is a list of block names or a dict, got the string {value!r}")
        return cls(blocks=_blocks(value, where))


def _blocks(value: Any, where: str) -> tuple[tuple[str, Optional[int]], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple((str(n), r) for n, r in value.items())
    out = []
    try:
        items = list(value)
    except TypeError:
        raise ConfigError(f"{where}: blocks must be names, (name, rows) pairs or {{name: rows}}, "
                          f"got {value!r}") from None
    for item in items:
        if isinstance(item, str):
            out.append((item, None))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            out.append((item[0], item[1]))
        else:
            raise ConfigError(f"{where}: block {item!r} is neither a name nor a (name, rows) pair")
    return tuple(out)


def resolve_blocks(spec: Optional[FusedSpec], fan_out: int, default: tuple[tuple[str, int], ...],
                   param: str) -> Optional[tuple[tuple[str, int, bool], ...]]:
    """``((name, rows, enabled), ...)`` for the weight ``param`` with ``fan_out`` output rows, or
    None for a plain adapter.

    Args:
        spec: the user's spec (None: plain adapter).
        fan_out: ``W.shape[0]``.
        default: the op's own blocks (``()`` when it has none).
        param: the parameter's name, for messages.

    Raises:
        ConfigError: sizes that do not add up to ``fan_out`` (or an equal split that does not
            divide), no blocks named for an op without defaults, or enable names not among the blocks.
    """
    if spec is None:
        return None
    blocks = spec.blocks or tuple(default)
    if not blocks:
        raise ConfigError(f"fused spec for '{param}' names no blocks and its op has no default blocks; "
                          "give blocks, e.g. {'blocks': {'q': 64, 'k': 16, 'v': 16}, 'enable': ('q', 'v')}")
    if blocks[0][1] is None:
        if fan_out % len(blocks):
            raise ConfigError(f"'{param}' has {fan_out} output rows, which do not split equally into blocks "
                              f"{[n for n, _ in blocks]}; give sizes, e.g. {{'{blocks[0][0]}': rows, ...}}")
        blocks = tuple((n, fan_out // len(blocks)) for n, _ in blocks)
    if sum(r for _, r in blocks) != fan_out:
        raise ConfigError(f"fused blocks {dict(blocks)} of '{param}' add up to {sum(r for _, r in blocks)} "
                          f"rows, but the weight has {fan_out} output rows; give block sizes that add up to {fan_out}")
    names = [n for n, _ in blocks]
    enable = names if spec.enable is None else list(spec.enable)
    unknown = [e for e in enable if e not in names]
    if unknown:
        raise ConfigError(f"fused enable names {unknown} for '{param}' are not among its blocks {names}")
    if not enable:
        raise ConfigError(f"fused spec for '{param}' enables no block; enable at least one or drop the target")
    return tuple((n, r, n in enable) for n, r in blocks)
