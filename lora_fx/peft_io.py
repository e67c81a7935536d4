"""Old path of :mod:`lora_fx.io.peft`; kept so existing imports work."""

from .io.peft import (CONFIG_NAME, PEFT_PREFIX, WEIGHTS_NAME, _from_peft, _to_peft, load_adapter,  # noqa: F401
                      save_adapter)

__all__ = ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME", "PEFT_PREFIX"]
