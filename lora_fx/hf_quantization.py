"""transformers' record of a quantized model, kept true on the adapted copy and on the folded model.

``from_pretrained(..., quantization_config=...)`` leaves on the model ``config.quantization_config``
(which ``save_pretrained`` writes and ``from_pretrained`` reads back), ``hf_quantizer`` and flags
such as ``is_quantized``.  transformers reads them in two places that matter here:

* ``Trainer`` refuses a model with ``is_quantized`` set unless PEFT adapters are attached
  (``transformers.trainer_utils.validate_quantization_for_training``): "purely quantized models"
  cannot be fine-tuned.  :func:`mark_adapted_` tells it that lora_fx's copy carries trainable adapters.
* ``from_pretrained`` quantizes every linear of a quantized checkpoint except the modules its config
  skips.  :func:`after_fold_` drops the record when no quantized weight is left (a float checkpoint),
  and otherwise lists the layers folded to float weights as skipped, so they load as float layers.

Only lora_fx's own copies are changed (the adapted model, the folded model); the user's model never is.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

from . import weights
from .state import QUANT_FLAG_ATTR

__all__ = ["mark_adapted_", "after_fold_"]

#: What transformers records on a model it quantized while loading.
_RECORD_ATTRS = ("hf_quantizer", "is_quantized", "quantization_method", "is_loaded_in_4bit", "is_loaded_in_8bit")


def mark_adapted_(root: nn.Module) -> nn.Module:
    """On lora_fx's copy of a quantized transformers model, clear ``is_quantized`` (its only reader
    besides ``Trainer``'s check is the ``half()`` / ``float()`` refusal), as transformers' own
    adapter integration does for a quantized model with adapters; returns ``root``.  The
    quantization config and quantizer stay, and :func:`after_fold_` restores the flag on a fold
    that is still quantized."""
    if root.__dict__.get("is_quantized") is True:
        root.__dict__["is_quantized"] = False
        root.__dict__[QUANT_FLAG_ATTR] = True
    return root


def after_fold_(folded: nn.Module, folded_params: Iterable[str]) -> nn.Module:
    """Make the folded model's quantization record true; returns ``folded`` (lora_fx's copy).

    No quantized weight left: the record goes (``save_pretrained`` writes a float checkpoint).
    Some left (``requantize=True``, or layers that were not adapted): the flag comes back, and each
    layer whose weight was folded to float (``folded_params``: parameter names) is added to the
    config's skipped modules (``llm_int8_skip_modules`` for bitsandbytes, ``modules_to_not_convert``
    for the other schemes), so ``from_pretrained`` keeps it a float layer."""
    cleared = folded.__dict__.pop(QUANT_FLAG_ATTR, False)
    config = getattr(folded, "config", None)
    qc = getattr(config, "quantization_config", None) if config is not None else None
    if all(weights.is_plain(p) for p in folded.parameters()):
        if config is not None and "quantization_config" in getattr(config, "__dict__", {}):
            del config.__dict__["quantization_config"]
        for attr in _RECORD_ATTRS:
            folded.__dict__.pop(attr, None)
        return folded
    if cleared:
        folded.__dict__["is_quantized"] = True
    float_layers = [n.rpartition(".")[0] for n in folded_params
                    if n.endswith(".weight") and weights.is_plain(folded.get_parameter(n))]
    if qc is not None and float_layers and not isinstance(qc, dict):
        attr = "llm_int8_skip_modules" if hasattr(qc, "llm_int8_skip_modules") else "modules_to_not_convert"
        skipped = getattr(qc, attr, None)
        if skipped is None:  # transformers' default skips (the LM head, tied weights) are then not added
            skipped = _default_skips(folded)
        setattr(qc, attr, list(skipped) + [re.escape(n) for n in float_layers if re.escape(n) not in skipped])
    return folded


def _default_skips(model: nn.Module) -> list[str]:
    """The modules transformers leaves unquantized when the config names none (its own helper)."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert
    except ImportError:  # pragma: no cover - depends on the installed transformers
        return []
    return list(get_keys_to_not_convert(model))
