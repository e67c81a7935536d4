"""Records a lora_fx GraphModule carries about its adapters (plain data: survives deepcopy/pickle)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx, nn

__all__ = ["AdapterRecord", "GraphState", "STATE_ATTR", "state_of", "is_adapted", "adapter_records"]

#: Attribute of every adapted ``GraphModule`` (root and blocks) holding its :class:`GraphState`.
STATE_ATTR = "_lora_fx"


@dataclass
class AdapterRecord:
    """One adapter on one base parameter inside one GraphModule.

    Attributes:
        param: base parameter name relative to the GraphModule (the first targeted alias).
        adapter: adapter name (``"default"`` unless named).
        aliases: every targeted name of the same parameter object in this GraphModule.
        consumers: ``(node name, op kind, lowering)`` of each rewritten call.
    """

    param: str
    adapter: str
    aliases: list[str] = field(default_factory=list)
    consumers: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass
class GraphState:
    """Per-GraphModule state: adapter module path → :class:`AdapterRecord`."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    version: int = 1


def state_of(module: nn.Module) -> GraphState | None:
    """The :class:`GraphState` of ``module`` if it is a lora_fx GraphModule, else None."""
    st = getattr(module, STATE_ATTR, None) if isinstance(module, fx.GraphModule) else None
    return st if isinstance(st, GraphState) else None


def is_adapted(module: nn.Module) -> bool:
    """True when ``module`` or any submodule carries lora_fx adapters."""
    return any(state_of(m) is not None and state_of(m).adapters for m in module.modules())


def adapter_records(root: nn.Module):
    """Yield ``(prefix, adapter module path in root, record, adapter module)`` for every record of
    every lora_fx GraphModule under ``root`` (root first, graph order).  One adapter reached from
    several GraphModules (a weight shared by two blocks) is yielded once per GraphModule."""
    for gm_path, sub in root.named_modules():
        st = state_of(sub)
        if st is None:
            continue
        prefix = f"{gm_path}." if gm_path else ""
        for path, rec in st.adapters.items():
            yield prefix, prefix + path, rec, sub.get_submodule(path)
