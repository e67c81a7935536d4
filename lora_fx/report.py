"""Site report: a table of adapted sites (:func:`summary`) and a picture of the graph (:func:`draw`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from torch import fx, nn

from lora_fx.passes.trace_regions import CONTAINER

from . import weights
from .adapters.module import LoraAdapter
from .errors import ConfigError
from .ops import DELTA_OPS, MERGE_OPS, dequantized, module_call
from .state import (INFERENCE_ATTR, KEPT_ATTR, STACKS_META, adapter_names, capture_of, frontend_of,
                    is_adapted, is_adapter_path, iter_adapters, left_out, region_of, regions)
from .site_view import sites

__all__ = ["summary", "SiteSummary", "draw"]

_COLUMNS = ("site", "adapter", "op", "weight shape", "rank", "lowering", "active", "enabled", "trainable params",
            "share")
_CAPTURE_COLUMNS = ("module", "class", "captured")


@dataclass(frozen=True)
class SiteSummary:
    """The table :func:`summary` returns.

    Attributes:
        rows: one dict per (adapted parameter, adapter) with the keys ``site``, ``adapter``, ``op``,
            ``weight shape``, ``rank``, ``lowering``, ``active`` (in the active set), ``enabled``
            (its on/off switch), ``trainable params`` (the adapter's parameter count:
            ``rank·(fan_in + fan_out)``, plus ``fan_out`` for DoRA), ``share`` (that count over all
            of the module's parameters) and ``captured`` (how the graph holding the site was
            captured: ``"fx"``, ``"export"``, or for a model that kept its class the region's
            ``"fx"`` / ``"fx (leaves: ...)"``).
        total_params: every parameter of the module (base + adapters), each tensor once.
        adapter_params: parameters of all adapters.
        trainable_params: parameters with ``requires_grad`` now.
        captured: a model that kept its class (the regions front-end): one dict per module the
            front-end visited, ``module`` (path), ``class`` and ``captured`` (``"fx"``,
            ``"fx (leaves: a, b)"`` or ``"kept: <reason>"``), in module order; else ``()``.
        not_captured: adaptable weights no graph reads (their module is kept as its own Python:
            MoE expert tensors, say), as dicts ``param``, ``weight shape``, ``reason``.
        left_out: one dict per (weight-like parameter, adapter) the adapter leaves out
            (:func:`lora_fx.left_out`), with the keys ``param``, ``adapter``, ``shape``, ``op``,
            ``reason`` and ``by_user`` (left out by the user's own ``targets`` / ``exclude``);
            those in ``not_captured`` are printed there only.
        inference_cache_bytes: bytes of merged weights the inference cache holds
            (:func:`lora_fx.inference_cache_`), or None while it is off.
    """

    rows: tuple[dict, ...]
    total_params: int
    adapter_params: int
    trainable_params: int
    captured: tuple[dict, ...] = ()
    not_captured: tuple[dict, ...] = ()
    left_out: tuple[dict, ...] = ()
    inference_cache_bytes: Optional[int] = None

    def __str__(self) -> str:
        out = _table(_COLUMNS, [[_fmt(k, r[k]) for k in _COLUMNS] for r in self.rows], right_from=4)
        out.append(f"{len(self.rows)} site(s); adapter params {self.adapter_params:,} of {self.total_params:,} "
                   f"({100 * self.adapter_params / max(self.total_params, 1):.2f}%); trainable now "
                   f"{self.trainable_params:,}")
        if self.captured:
            n_regions = sum(not r["captured"].startswith("kept") for r in self.captured)
            out += ["", f"captured: {n_regions} region(s) rewritten as graphs, "
                        f"{len(self.captured) - n_regions} module(s) kept as their own Python "
                        "(containers left out, repeated layers shown once with their index as *)"]
            out += ["  " + line for line in _table(_CAPTURE_COLUMNS, _grouped(self.captured))]
        if self.not_captured:
            out += ["", "weights no graph reads (not adaptable here):"]
            out += [f"  {r['param']} {_fmt('weight shape', r['weight shape'])}: {r['reason']}"
                    for r in self.not_captured]
        shown = {r["param"] for r in self.not_captured}
        rest = [e for e in self.left_out if e["param"] not in shown]
        if rest:
            out += ["", f"left out ({len(rest)}):"]
            out += [f"  {e['param']} ({'x'.join(str(d) for d in e['shape'])}, adapter {e['adapter']!r}): {e['reason']}"
                    for e in rest]
        if self.inference_cache_bytes is not None:
            out += ["", f"inference cache: on, {self.inference_cache_bytes / 2**20:.2f} MiB of merged weights "
                        "(lora_fx.inference_cache_(model, enabled=False) frees it)"]
        return "\n".join(out)


def _table(columns, cells, right_from: int = 99) -> list[str]:
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.rjust(w) if i >= right_from else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
            .rstrip() for row in cells]
    return out


def _grouped(captured) -> list[list[str]]:
    """Rows of the capture section with layer indices folded (``layers.0`` … ``layers.23`` → ``layers.*``)."""
    groups: dict[tuple, int] = {}
    for r in captured:
        if r["captured"] == f"kept: {CONTAINER}":  # containers: not shown
            continue
        how = r["captured"] if len(r["captured"]) <= 72 else r["captured"][:70].rstrip(", ") + " …"
        key = (re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", r["module"]) or "<root>", r["class"], how)
        groups[key] = groups.get(key, 0) + 1
    return [[m + (f" (x{n})" if n > 1 else ""), c, how] for (m, c, how), n in groups.items()]


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


def _cache_bytes(gm: nn.Module) -> Optional[int]:
    cache = gm.__dict__.get(INFERENCE_ATTR)
    return None if cache is None else cache.nbytes


def _capture_of_site(gm: nn.Module, param: str) -> str:
    """How the graph adapting ``param`` was captured: its region's, or the root front-end's."""
    path = param.rpartition(".")[0]
    while path:
        how = capture_of(gm.get_submodule(path))
        if how is not None:
            return how
        path = path.rpartition(".")[0]
    return capture_of(gm) or frontend_of(gm) or "fx"


def _capture_rows(gm: nn.Module) -> tuple[tuple[dict, ...], tuple[dict, ...]]:
    if isinstance(gm, fx.GraphModule):
        return (), ()
    captured, missing = [], []
    for path, m in gm.named_modules():
        how = capture_of(m)
        if how is None:
            continue
        captured.append({"module": path, "class": type(m).__name__, "captured": how})
        if KEPT_ATTR in m.__dict__:  # its own parameters are read by its Python only
            stacks = region_of(m).meta.get(STACKS_META, {}) if region_of(m) is not None else {}
            for name, p in m.named_parameters(recurse=False):
                if is_adapter_path(name) or weights.reason(p) is not None or name in stacks:
                    continue  # stacks its weights region reads: adapted, or in left_out with the reason
                missing.append({"param": f"{path}.{name}" if path else name,
                                "weight shape": tuple(weights.logical_shape(p)), "reason": how})
    return tuple(captured), tuple(missing)


def summary(gm: nn.Module, *, show: bool = True) -> SiteSummary:
    """Table of every adapted site of ``gm``: site (base parameter), adapter, op, weight shape, rank,
    lowering, whether the adapter is in the active set and switched on, its parameter count and its
    share of the model; for a model that kept its class, also how each module was captured and which
    weights no graph reads; then one line per weight-like parameter an adapter leaves out, with the
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
                     "enabled": bool(s.module.enabled), "trainable params": n, "share": n / max(total, 1),
                     "captured": _capture_of_site(gm, s.param)})
    captured, missing = _capture_rows(gm)
    skipped = tuple({"param": e.param, "adapter": name, "shape": tuple(e.shape), "op": e.op, "reason": e.reason,
                     "by_user": e.by_user} for name in adapter_names(gm) for e in left_out(gm, name))
    result = SiteSummary(rows=tuple(rows), total_params=total,
                         adapter_params=sum(p.numel() for _, _, m in iter_adapters(gm) for p in m.parameters()),
                         trainable_params=sum(p.numel() for p in gm.parameters() if p.requires_grad),
                         captured=captured, not_captured=missing, left_out=skipped,
                         inference_cache_bytes=_cache_bytes(gm))
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


def _laid_out(gm: fx.GraphModule):
    """The node graph of ``gm`` with labels, colours and positions: ``(graph, pos, labels, colors, width, depth)``."""
    import networkx as nx

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
    return graph, pos, labels, colors, width, depth


def _panels(gm: nn.Module, title: Optional[str]) -> list[tuple[str, fx.GraphModule]]:
    if isinstance(gm, fx.GraphModule):
        n_sites = len(sites(gm)) if is_adapted(gm) else 0
        return [(title or f"{type(gm).__name__}: {n_sites} adapted site(s)", gm)]
    groups: dict[str, list] = {}  # generated code -> [(path, region)]: one panel per distinct graph
    for path, region in regions(gm):
        if is_adapted(region):
            groups.setdefault(region.code, []).append((path or "<root>", region))
    if not groups:
        raise ConfigError(f"draw() needs a torch.fx.GraphModule or an adapted model (from lora_fx.transform), got "
                          f"{type(gm).__name__} without adapted regions")
    return [(f"{members[0][0]} ({type(members[0][1]).__name__})"
             + (f" and {len(members) - 1} like it" if len(members) > 1 else ""), members[0][1])
            for members in groups.values()]


def draw(gm: nn.Module, path: Union[str, os.PathLike], *, title: Optional[str] = None, dpi: int = 120) -> Path:
    """Write a picture of ``gm``'s (root) graph with the adapted sites highlighted: LoRA nodes
    (merge / factored delta) in red with their adapter name, rank and lowering, the ops whose
    weights they adapt in orange, other ops in blue, inputs/outputs and plain parameters in grey.
    Adapter parameter reads are folded into their LoRA node.  Traced blocks appear as one node
    (orange, with their number of LoRA sites, when adapters live inside).  For a model that kept
    its class there is no root graph: each distinct adapted region is drawn in a panel of its own
    (regions with the same code, the projections of every layer, share one panel).

    The graph is a :class:`networkx.DiGraph` laid out by topological generation
    (``networkx.topological_generations``) and drawn with matplotlib (Agg backend); the file type
    follows ``path``'s suffix (``.png``, ``.svg``, ``.pdf``).

    Args:
        gm: a ``torch.fx.GraphModule`` (adapted or not), or an adapted model that kept its class.
        path: output file (parent folders are created).
        title: figure title (default: the class name and number of adapted sites; per region panel,
            its module path).
        dpi: resolution for raster formats.

    Returns:
        ``Path(path)``.

    Raises:
        ConfigError: ``gm`` is neither a ``torch.fx.GraphModule`` nor an adapted model with regions.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import networkx as nx
    from matplotlib.patches import Patch

    panels = _panels(gm, title)
    laid = [_laid_out(g) for _, g in panels]
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(sum(max(6.0, 2.2 * w) for *_, w, _ in laid), max(max(4.0, 0.6 * d) for *_, d in laid)))
    for ax, (label, _), (graph, pos, labels, colors, _, _) in zip(axes[0], panels, laid):
        nx.draw_networkx_edges(graph, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#666666", width=0.8,
                               node_size=900)
        for color in sorted(set(colors.values())):  # one text box per node, coloured by role
            group = {k: labels[k] for k in graph.nodes if colors[k] == color}
            nx.draw_networkx_labels(graph, pos, ax=ax, labels=group, font_size=7,
                                    bbox=dict(boxstyle="round,pad=0.35", facecolor=color, edgecolor="#333333",
                                              linewidth=0.5))
        ax.set_title(label, fontsize=9 if len(panels) > 1 else None)
        ax.axis("off")
    if len(panels) > 1:
        n_sites = len(sites(gm))
        fig.suptitle(title or f"{type(gm).__name__}: {n_sites} adapted site(s) in {len(panels)} distinct region(s)")
    axes[0][-1].legend(handles=[Patch(color="#e4572e", label="LoRA node"), Patch(color="#f5a623", label="adapted op"),
                                Patch(color="#76b7e5", label="other op"),
                                Patch(color="#cccccc", label="input / param / output")],
                       loc="lower right", fontsize=7, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
