"""``LoraGraphModule``: a ``torch.fx.GraphModule`` that keeps its whole module structure through
``copy.deepcopy``, ``pickle`` and ``torch.save``.

A stock ``GraphModule`` rebuilds itself on copy and unpickle from the attributes its graph
references only, turning ``nn.ModuleList`` s into plain modules and dropping unreferenced
parameters, buffer persistence, hooks and extra attributes (the adapter records among them).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import fx
from torch.fx.graph_module import _deserialize_graph_module, _format_import_block, _forward_from_src
from torch.package import sys_importer

__all__ = ["LoraGraphModule"]

_GM_OWN = {"_graph", "_code", "_lineno_map", "_prologue_start", "_in_spec", "_out_spec", "meta",
           "_tracer_cls", "_tracer_extras", "_replace_hooks", "_create_node_hooks", "_erase_node_hooks",
           "_deepcopy_hooks", "_graphmodule_cls_name"}


def _restore(gm: fx.GraphModule, state: dict[str, Any]) -> fx.GraphModule:
    for key, value in state.items():
        if key not in _GM_OWN:
            gm.__dict__[key] = value
    return gm


def _reduce_lora_graph_module(body: dict[str, Any], import_block: str) -> "LoraGraphModule":
    forward = _forward_from_src(import_block + body["_code"], {})
    gm = _deserialize_graph_module(forward, dict(body), graph_module_cls=LoraGraphModule)
    return _restore(gm, body)


class LoraGraphModule(fx.GraphModule):
    """A ``GraphModule`` whose copies and pickles are the same module (children, parameters,
    buffers and their persistence, hooks, training flag and every extra attribute)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "LoraGraphModule":
        res = super().__deepcopy__(memo)
        return _restore(res, {k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k not in _GM_OWN})

    def __reduce__(self):
        body = self.__dict__.copy()
        python_code = self.recompile()
        import_block = _format_import_block(python_code.globals, sys_importer)
        del body["_graph"]
        return (_reduce_lora_graph_module, (body, import_block))
