"""Old path of :mod:`lora_fx.deploy`; kept so existing imports work."""

from .deploy import export_folded, export_onnx, parity_report  # noqa: F401

__all__ = ["export_folded", "export_onnx", "parity_report"]
