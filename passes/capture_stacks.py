"""Capture pass for kept modules that read stacks of expert weights themselves.

After the regions front-end (:mod:`.trace_regions`), a module it kept as its own Python (e.g.
transformers' ``*Experts``) whose op-table rule reads some of its own parameters as stacks of expert
matrices (:attr:`lora_fx.rules.ModuleRule.stack`) gets a *weights region*: a graph without inputs,
``get_attr(W) → output {name: W}``, over the module's own tables, with the probed
:class:`~lora_fx.rules.ExpertStack` of each stack in its ``meta``; and a
:class:`~lora_fx.stack_forward.StackForward` as its ``forward``.  The analysis then finds each
stack as a site of that graph (:mod:`.find_sites`), the adapter pass lowers it as any merge-family
site (``lora_weight``, :mod:`.insert_lora`), and every reader of graphs (sites, fold, files,
delete, hot-swap) sees it through :func:`lora_fx.state.regions`.
"""

from __future__ import annotations

from torch import fx, nn

from lora_fx.rules import module_rule
from lora_fx.stack_forward import StackForward
from lora_fx.state import KEPT_ATTR, REGION_ATTR, STACKS_META

from .trace_regions import _region_module

__all__ = ["capture_stacks_"]


def capture_stacks_(root: nn.Module) -> list[str]:
    """Give every kept module of ``root`` whose rule reads own parameters as expert stacks a weights
    region and a :class:`StackForward` (in place); returns their paths."""
    found = []
    for path, m in root.named_modules():
        if REGION_ATTR in m.__dict__ or KEPT_ATTR not in m.__dict__ or "forward" in m.__dict__:
            continue
        rule = module_rule(m)
        stacks = {}
        for name, _ in m.named_parameters(recurse=False):
            stack = rule.stack(m, name)
            if stack is not None:
                stacks[name] = stack
        if not stacks:
            continue
        graph = fx.Graph()
        graph.output({name: graph.get_attr(name) for name in stacks})
        gm = _region_module(m, graph, ())
        gm.meta[STACKS_META] = stacks
        m.__dict__[REGION_ATTR] = gm
        m.__dict__["forward"] = StackForward(m)
        found.append(path)
    return found
