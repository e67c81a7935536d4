"""lora_fx: LoRA as a compiler pass over torch.fx graphs.

``gm = lora_fx.transform(model, rank=16)`` returns a new ``GraphModule`` (or, for a model torch.fx
cannot trace whole, a copy of the model of its own class, its capturable modules rewritten as
regions) in which every targeted weight is seen by its op as ``W + scaling · B @ A`` (Hu et al.,
ICLR 2022); only the adapters train.
"""

from .adapters.module import LoraAdapter
from .adapters.lifecycle import (active_adapters, adapter_names, add_adapter, delete_adapter, disable_adapters,
                                 set_active_adapters, set_adapter_weights)
from .adapters.hotswap import enable_adapters_, load_adapter_values_, reserve_rank_, set_scale_
from .adapters.trainable import adapter_parameters, mark_only_lora_as_trainable, register_model_param_after_backward
from .api import Site, fold, sites, transform
from .config import LoraConfig
from .deploy import export_folded, export_onnx
from .errors import (AdapterFileError, AdapterMismatchError, AlreadyAdaptedError, ConfigError,
                     ExportFileError, ExportParityError, InputGuardError, LoraFxError, NonFiniteError, LoraFxWarning, NotAdaptedError,
                     RoutingError, TargetError, TraceError, UnknownAdapterError, UnsupportedSiteError)
from .fused import FusedSpec
from .inference import inference_cache, inference_cache_, inference_cache_bytes
from .io.loralib import load_loralib_state_dict, loralib_state_dict
from .io.peft import load_adapter, save_adapter
from .io.state_dict import lora_state_dict
from .report import SiteSummary, draw, summary
from .rules import register_function_rule, register_module_rule
from .routing import disable_routing_, enable_routing_, route_adapters
from .state import LeftOut, left_out
from . import distributed
from . import hf_adapter_api  # noqa: F401  (fills adapter_methods.METHODS: transformers' adapter methods)
from .distributed import gather_lora_state_dict
# old module paths (thin re-exports), importable as attributes of the package as before
from . import adapter, control, folded_export, init, loralib_io, peft_io, remat, training  # noqa: F401,E402

__version__ = "0.1.0"

__all__ = [
    "transform", "fold", "sites", "Site", "LoraConfig", "LoraAdapter", "FusedSpec",
    "mark_only_lora_as_trainable", "lora_state_dict", "adapter_parameters", "register_model_param_after_backward",
    "load_loralib_state_dict", "loralib_state_dict",
    "distributed", "gather_lora_state_dict",
    "LoraFxError", "LoraFxWarning", "ConfigError", "TargetError", "TraceError", "InputGuardError",
    "UnsupportedSiteError",
    "NotAdaptedError", "UnknownAdapterError", "AlreadyAdaptedError", "AdapterMismatchError", "AdapterFileError",
    "ExportParityError", "ExportFileError", "NonFiniteError", "export_folded", "export_onnx", "__version__",
    "add_adapter", "delete_adapter", "set_active_adapters", "set_adapter_weights", "disable_adapters",
    "active_adapters", "adapter_names", "save_adapter", "load_adapter", "summary", "SiteSummary", "left_out",
    "LeftOut", "draw",
    "set_scale_", "enable_adapters_", "load_adapter_values_", "reserve_rank_",
    "register_module_rule", "register_function_rule",
    "route_adapters", "enable_routing_", "disable_routing_", "RoutingError",
    "inference_cache_", "inference_cache", "inference_cache_bytes",
]
