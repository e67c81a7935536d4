"""Site report: a table of adapted sites (:func:`summary`) and a picture of the graph (:func:`draw`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from torch import fx, nn

from .adapters.module import LoraAdapter
from .errors import ConfigError
from .ops import DELTA_OPS, MERGE_OPS, dequantized, module_call
from .state import adapter_names, is_adapted, is_adapter_path, iter_adapters, left_out, sites

__all__ = ["summary", "SiteSummary", "draw"]

_COLUMNS = ("site", "adapter", "op", "weight shape", "rank", "lowering", "active", "enabled", "trainable params",
            "share")


@dataclass(frozen=True)
class SiteSummary:
    """The table :func:`summary` returns.

    Attributes:
        rows: one dict per (adapted parameter, adapter) with the keys ``site``, ``adapter``, ``op``,
            ``weight shape``, ``rank``, ``lowering``, ``active`` (in the active set), ``enabled``
            (its on/off switch), ``trainable params`` (the
            adapter's parameter count: ``rank·(fan_in + fan_out)``, plus ``fan_out`` for DoRA) and
            ``share`` (that count over all of the module's parameters).
        total_params: every parameter of the module (base + adapters), each tensor once.
        adapter_params: parameters of all adapters.
        trainable_params: parameters with ``requires_grad`` now.
        left_out: one dict per (weight-like parameter, adapter) the adapter leaves out
            (:func:`lora_fx.left_out`), with the keys ``param``, ``adapter``, ``shape``, ``op``,
            ``reason`` and ``by_user`` (left out by the user's own ``targets`` / ``exclude``).
    """

    rows: tuple[dict, ...]
    total_params: int
    adapter_params: int
    trainable_params: int
    left_out: tuple[dict, ...] = ()

    def __str__(self) -> str:
        cells = [[_fmt(k, r[k]) for k in _COLUMNS] for r in self.rows]
        widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(_COLUMNS)]
        line = "  ".join(c.ljust(w) for c, w in zip(_COLUMNS, widths))
        out = [line, "  ".join("-" * w for w in widths)]
        out += ["  ".join(v.rjust(w) if i >= 4 else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                for row in cells]
        out.append(f"{len(self.rows)} site(s); adapter params {self.adapter_params:,} of {self.total_params:,} "
                   f"({100 * self.adapter_params / max(self.total_params, 1):.2f}%); trainable now "
                   f"{self.trainable_params:,}")
        if self.left_out:
            out.append(f"left out ({len(self.left_out)}):")
            out += [f"  {e['param']} ({'x'.join(str(d) for d in e['shape'])}, adapter {e['adapter']!r}): {e['reason']}"
                    for e in self.left_out]
        return "\n".join(out)


def _fmt(key: str, value) -> str:
    if key == "weight shape":
        return "x".join(str(s) for s in value)
    if key == "share":
        return f"{100 * value:.2f}%"
    if key == "trainable params":
        return f"{value:,}"
    if key in ("active", "enabled"):
        return "yes" if value else "no"
    return str(value)


def summary(gm: nn.Module, *, show: bool = True) -> SiteSummary:
    """Table of every adapted site of ``gm``: site (base parameter), adapter, op, weight shape, rank,
    lowering, whether the adapter is in the active set and switched on, its parameter count and its
    share of the model; then one line per weight-like parameter an adapter leaves out, with the
    reason (:func:`lora_fx.left_out`).

    Args:
        gm: a module from :func:`lora_fx.transform`.
        show: also print the table (``str(result)``).

    Returns:
        :class:`SiteSummary` (``.rows`` as dicts; ``str()`` renders the table).

    Raises:
        NotAdaptedError: ``gm`` carries no adapters.
    """
    found = sites(gm)
    total = sum(p.numel() for p in gm.parameters())
    rows = []
    for s in found:
        n = sum(p.numel() for p in s.module.parameters())
        rows.append({"site": s.param, "adapter": s.adapter, "op": s.op, "weight shape": tuple(s.shape),
                     "rank": s.rank, "lowering": s.lowering, "active": bool(s.module.active),
                     "enabled": bool(s.module.enabled),
                     "trainable params": n, "share": n / max(total, 1)})
    skipped = tuple({"param": e.param, "adapter": name, "shape": tuple(e.shape), "op": e.op, "reason": e.reason,
                     "by_user": e.by_user} for name in adapter_names(gm) for e in left_out(gm, name))
    result = SiteSummary(rows=tuple(rows), total_params=total,
                         adapter_params=sum(p.numel() for _, _, m in iter_adapters(gm) for p in m.parameters()),
                         trainable_params=sum(p.numel() for p in gm.parameters() if p.requires_grad),
                         left_out=skipped)
    if show:
        print(result)
    return result


def _adapter_of(gm: fx.GraphModule, node: fx.Node) -> tuple[Optional[LoraAdapter], str]:
    """The adapter a LoRA node reads (via its ``<owner>.lora.<name>.<param>.*`` attributes) and its name."""
    for a in node.args[1:]:
        if isinstance(a, fx.Node) and _is_adapter_attr(a):
            path = str(a.target).rpartition(".")[0]
            try:
                mod = gm.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(mod, LoraAdapter):
                return mod, path.split(".")[-2]
    return None, "?"


def _is_adapter_attr(node: fx.Node) -> bool:
    return node.op in ("get_attr", "call_module") and is_adapter_path(str(node.target))


def draw(gm: nn.Module, path: Union[str, os.PathLike], *, title: Optional[str] = None, dpi: int = 120) -> Path:
    """Write a picture of ``gm``'s (root) graph with the adapted sites highlighted: LoRA nodes
    (merge / factored delta) in red with their adapter name, rank and lowering, the ops whose
    weights they adapt in orange, other ops in blue, inputs/outputs and plain parameters in grey.
    Adapter parameter reads are folded into their LoRA node.  Traced blocks appear as one node
    (orange, with their number of LoRA sites, when adapters live inside).

    The graph is a :class:`networkx.DiGraph` laid out by topological generation
    (``networkx.topological_generations``) and drawn with matplotlib (Agg backend); the file type
    follows ``path``'s suffix (``.png``, ``.svg``, ``.pdf``).

    Args:
        gm: a ``torch.fx.GraphModule`` (adapted or not).
        path: output file (parent folders are created).
        title: figure title (default: the class name and number of adapted sites).
        dpi: resolution for raster formats.

    Returns:
        ``Path(path)``.

    Raises:
        ConfigError: ``gm`` is not a ``torch.fx.GraphModule``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import networkx as nx
    from matplotlib.patches import Patch

    if not isinstance(gm, fx.GraphModule):
        raise ConfigError(f"draw() needs a torch.fx.GraphModule (from lora_fx.transform), got {type(gm).__name__}")
    graph = nx.DiGraph()
    keep = [n for n in gm.graph.nodes if not _is_adapter_attr(n)]
    adapted_users = set()
    labels, colors = {}, {}
    for n in keep:
        graph.add_node(n.name)
        if n.op == "call_function" and n.target is not dequantized and (n.target in MERGE_OPS or n.target in DELTA_OPS):
            a, name = _adapter_of(gm, n)
            kind = "DoRA" if n.target.__name__ == "dora_merge" else ("merge" if n.target in MERGE_OPS else "factored")
            labels[n.name] = f"LoRA '{name}'\nr={a.rank if a else '?'} {kind}"
            colors[n.name] = "#e4572e"
            for u in n.users:
                if n.target in MERGE_OPS:
                    adapted_users.add(u.name)
            if n.target in DELTA_OPS and isinstance(n.args[0], fx.Node):
                adapted_users.add(n.args[0].name)
        elif n.op == "call_module":
            mod = gm.get_submodule(n.target)
            labels[n.name] = f"{n.target}\n{type(mod).__name__}"
            colors[n.name] = "#76b7e5"
            if isinstance(mod, fx.GraphModule) and is_adapted(mod):  # a traced block with adapters inside
                labels[n.name] += f"\n({len(sites(mod))} LoRA sites)"
                adapted_users.add(n.name)
        elif n.op == "call_function":
            fn = "functional_call" if n.target is module_call else getattr(n.target, "__name__", str(n.target))
            labels[n.name] = fn
            colors[n.name] = "#76b7e5"
        elif n.op == "call_method":
            labels[n.name] = f".{n.target}()"
            colors[n.name] = "#76b7e5"
        else:  # placeholder, get_attr, output
            labels[n.name] = n.target if n.op == "get_attr" else n.name
            colors[n.name] = "#cccccc"
    for n in keep:
        for u in n.users:
            if u.name in graph:
                graph.add_edge(n.name, u.name)
    for name in adapted_users:
        if name in colors and colors[name] != "#e4572e":
            colors[name] = "#f5a623"
    for gen, layer in enumerate(nx.topological_generations(graph)):
        for name in layer:
            graph.nodes[name]["layer"] = gen
    pos = nx.multipartite_layout(graph, subset_key="layer", align="horizontal")
    pos = {k: (x, -y) for k, (x, y) in pos.items()}
    depth = 1 + max((d["layer"] for _, d in graph.nodes(data=True)), default=0)
    width = max(len(layer) for layer in nx.topological_generations(graph)) if len(graph) else 1
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * width), max(4.0, 0.6 * depth)))
    nx.draw_networkx_edges(graph, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#666666", width=0.8,
                           node_size=900)
    for color in sorted(set(colors.values())):  # one text box per node, coloured by role
        group = {k: labels[k] for k in graph.nodes if colors[k] == color}
        nx.draw_networkx_labels(graph, pos, ax=ax, labels=group, font_size=7,
                                bbox=dict(boxstyle="round,pad=0.35", facecolor=color, edgecolor="#333333",
                                          linewidth=0.5))
    n_sites = len(sites(gm)) if is_adapted(gm) else 0
    ax.set_title(title or f"{type(gm).__name__}: {n_sites} adapted site(s)")
    ax.legend(handles=[Patch(color="#e4572e", label="LoRA node"), Patch(color="#f5a623", label="adapted op"),
                       Patch(color="#76b7e5", label="other op"),
                       Patch(color="#cccccc", label="input / param / output")],
              loc="lower right", fontsize=7, frameon=False)
    ax.axis("off")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path

