"""Graph passes of lora_fx (installed as ``lora_fx.passes``); one pass per module, in pipeline order.

* :mod:`.capture`: front-end selection (torch.fx; when it fails, torch.export given example inputs,
  else the regions front-end).
* :mod:`.trace_fx`: torch.fx front-end: an ``nn.Module`` → a hierarchy of ``GraphModule`` s.
* :mod:`.trace_regions`: regions front-end: the model keeps its class, each module torch.fx can
  capture on its own becomes a region, the rest stays the model's own Python.
* :mod:`.capture_stacks`: kept modules that read their own stacks of expert weights get a weights
  region (their adapters' lazy ``W + ΔW``).
* :mod:`.trace_export`: torch.export front-end, rebuilt into the same hierarchy.
* :mod:`.follow_mode`: makes an exported graph follow ``.train()`` / ``.eval()``.
* :mod:`.route_quantized`: prepares quantized modules and routes linears on quantized weights
  through the frozen-base op (undone by fold).
* :mod:`.find_sites`: pure analysis: which parameters reach which ops.
* :mod:`.match_recompute`: which adapter inputs can be recomputed in backward.
* :mod:`.insert_lora`: registers adapters and inserts merge / factored nodes.
* :mod:`.remove_lora`: takes adapters out again (shared by ``delete_adapter`` and fold).
* :mod:`.fold`: evaluates the deltas once and writes plain weights into a new module.
* :mod:`.route`: one routed node per factored site (a different adapter per sample), and back.
* :mod:`.match_linear_site`: the code a graph module runs (not its graph): a linear site's base op
  and first adapter as one :func:`lora_fx.linear_site.linear_site` call (merged weight, factored
  gradients).
* :mod:`.inference_variant`: a region's inference form (factored sites on a cached merged weight,
  used by :mod:`lora_fx.inference` under ``no_grad``).

Passes import the library modules they use (``lora_fx.rules``, ``lora_fx.ops``, ``lora_fx.state``,
``lora_fx.weights``, ...), never the package facade or the adapters package.
"""

from . import (capture, capture_stacks, find_sites, fold, follow_mode, inference_variant, insert_lora,
               match_linear_site, match_recompute, remove_lora, route, route_quantized, trace_export, trace_fx, trace_regions)
# old module paths (thin re-exports), importable as attributes of the package as before
from . import export, remat, trace  # noqa: F401,E402

__all__ = ["capture", "trace_fx", "trace_regions", "capture_stacks", "trace_export", "follow_mode", "route_quantized",
           "find_sites", "match_recompute", "match_linear_site", "insert_lora", "remove_lora", "fold", "route", "inference_variant"]
