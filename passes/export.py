"""Old path of the torch.export front-end, now :mod:`lora_fx.passes.trace_export`,
:mod:`lora_fx.passes.follow_mode` and :mod:`lora_fx.passes.capture`; kept so existing imports work."""

from .capture import FRONTENDS, capture  # noqa: F401
from .follow_mode import add_if_training_, follow_mode_, train_only  # noqa: F401
from .trace_export import export_error as _export_error  # noqa: F401
from .trace_export import (default_dynamic_shapes, export_hierarchy,  # noqa: F401
                           normalize_example_inputs, resolve_dynamic_shapes)

__all__ = ["FRONTENDS", "capture", "export_hierarchy", "follow_mode_", "normalize_example_inputs", "default_dynamic_shapes", "resolve_dynamic_shapes", "train_only"]
