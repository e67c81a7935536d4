"""Names and keys: where adapters live in a module tree and how their names read.

The submodule name of adapter holders (:data:`ADAPTER_ATTR`), the module names PyTorch's wrappers
insert (:data:`WRAPPER_PARTS`), and the functions that build, recognise and clean parameter,
module and state-dict names with them.  :mod:`lora_fx.state` re-exports all of it.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from .errors import ConfigError

__all__ = ["ADAPTER_ATTR", "WRAPPER_PARTS", "BIAS_MODES", "adapter_path", "is_adapter_path", "is_lora_key",
           "unwrap", "plain_name", "adapter_modules", "check_bias", "is_bias_key", "adapter_owners", "is_lora_layer"]

#: Submodule under which an owner module holds its adapters: ``owner.lora[adapter_name][param_name]``
#: (in a model that kept its class, the second owner of a tied weight holds the first owner's
#: adapter through an unregistered ``__dict__`` entry of this name: one copy in ``state_dict``).
ADAPTER_ATTR = "lora"
#: Module names inserted by PyTorch's wrappers: ``torch.compile`` (``OptimizedModule._orig_mod``),
#: FSDP1 (``_fsdp_wrapped_module``), ``checkpoint_wrapper`` (``_checkpoint_wrapped_module``).
WRAPPER_PARTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def adapter_path(param_fqn: str, adapter_name: str) -> str:
    """Module path of the adapter of base parameter ``param_fqn`` (e.g. ``"fc.weight"`` →
    ``"fc.lora.default.weight"``)."""
    owner, _, pname = param_fqn.rpartition(".")
    prefix = f"{owner}." if owner else ""
    return f"{prefix}{ADAPTER_ATTR}.{adapter_name}.{pname}"


def is_adapter_path(name: str) -> bool:
    """Whether ``name`` (a parameter, buffer or module path) lies inside a lora_fx adapter holder:
    one of its components is :data:`ADAPTER_ATTR` followed by more (``"fc.lora.default.weight.lora_A"``)."""
    return f".{ADAPTER_ATTR}." in f".{name}"


def is_lora_key(name: str) -> bool:
    """Whether a parameter / state-dict key belongs to any LoRA adapter: lora_fx's, or a hand-built
    layer's (loralib's rule, ``"lora_"`` in the name, restricted to whole-word use: a name component
    starting with ``lora_`` (``lora_A``, ``lora_magnitude``) or containing ``_lora_`` (LoRA-Torch's
    ``w_lora_A``), so a user's ``flora_w`` is not taken for an adapter)."""
    return any(part.startswith("lora_") or "_lora_" in part for part in name.split("."))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` (``OptimizedModule``), ``DistributedDataParallel`` and
    ``DataParallel`` wrappers (any nesting), else ``model`` itself (FSDP2 and composable
    checkpointing do not wrap)."""
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(model._modules.get("_orig_mod"), nn.Module) and type(model).__name__ == "OptimizedModule":
            model = model._modules["_orig_mod"]
        else:
            return model


def plain_name(name: str) -> str:
    """``name`` (a parameter, buffer, module path or state-dict key) without the parts PyTorch's
    wrappers insert (:data:`WRAPPER_PARTS`): ``"_orig_mod.fc.weight"`` → ``"fc.weight"``."""
    if not any(w in name for w in WRAPPER_PARTS):
        return name
    return ".".join(p for p in name.split(".") if p not in WRAPPER_PARTS)


def adapter_modules(root: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{module path: (adapter name, adapter module)}`` of every path under which an adapter
    module is registered (a tied weight's adapter under each of its owners), plain names
    (:func:`plain_name`), in registration order."""
    out: dict[str, tuple[str, nn.Module]] = {}
    for name, m in unwrap(root).named_modules(remove_duplicate=False):
        parts = name.split(".")
        if len(parts) >= 3 and parts[-3] == ADAPTER_ATTR and not is_adapter_path(".".join(parts[:-3])):
            out.setdefault(plain_name(name), (parts[-2], m))
    return out


#: ``bias`` modes of :func:`lora_fx.mark_only_lora_as_trainable` and :func:`lora_fx.lora_state_dict`.
BIAS_MODES = ("none", "all", "lora_only")


def check_bias(bias: str) -> None:
    """Raises :class:`~lora_fx.errors.ConfigError` unless ``bias`` is one of :data:`BIAS_MODES`."""
    if bias not in BIAS_MODES:
        raise ConfigError(f"bias must be one of {BIAS_MODES}, got {bias!r}")


def is_bias_key(name: str) -> bool:
    """loralib's ``'bias' in name``, on the last component only, so ``in_proj_bias`` and ``bias_k``
    count but a module named ``bias_net`` does not make its weight a bias."""
    return "bias" in name.rsplit(".", 1)[-1]


def adapter_owners(model: nn.Module) -> list[nn.Module]:
    """Modules holding adapters: lora_fx's (an :data:`ADAPTER_ATTR` ``ModuleDict``) or their own
    ``lora_A`` (hand-built layers)."""
    return [m for m in model.modules()
            if isinstance(m._modules.get(ADAPTER_ATTR, m.__dict__.get(ADAPTER_ATTR)), nn.ModuleDict)
            or hasattr(m, "lora_A")]


def is_lora_layer(m: nn.Module) -> bool:
    """A hand-built LoRA layer: ``lora_fx.nn``'s, loralib's or LoRA-Torch's (all derive from a class
    named ``LoRALayer``), whatever its rank."""
    return any(c.__name__ == "LoRALayer" for c in type(m).__mro__)
