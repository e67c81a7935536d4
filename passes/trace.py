"""Old path of :mod:`lora_fx.passes.trace_fx` (torch.fx front-end); kept so existing imports work."""

from .trace_fx import (LoraTracer, assert_is_none, build_graph_module, graph_modules,  # noqa: F401
                       trace_hierarchy)

__all__ = ["LoraTracer", "assert_is_none", "trace_hierarchy", "build_graph_module", "graph_modules"]
