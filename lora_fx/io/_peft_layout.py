"""HF PEFT's LoRA layouts and rules, as data: which modules PEFT's LoRA covers, the tensor names and
shapes per layer family, the orientation mapping to and from lora_fx's factors, PEFT's pattern
and ``modules_to_save`` matching, and one adapter's factors as PEFT computes them.

Layouts (``W`` the base weight; ours: ``ΔW = s·(B @ A).reshape(W.shape)``, ``A: (r, W[0].numel())``,
``B: (W.shape[0], r)``; PEFT keys are ``base_model.model.<module>.<name>``):

=================  ====================  ==================================================
module             W                     PEFT tensors
=================  ====================  ==================================================
``nn.Linear``      ``(out, in)``         ``lora_A.weight = A``, ``lora_B.weight = B``
``nn.ConvNd``      ``(out, in, *k)``     ``lora_A.weight = A.view(r, in, *k)``,
                                         ``lora_B.weight = B.view(out, r, 1, ...)``
``nn.Embedding``   ``(num, dim)``        ``lora_embedding_A = Bᵀ (r, num)``,
                                         ``lora_embedding_B = Aᵀ (dim, r)`` (transposed)
GPT-2 ``Conv1D``   ``(in, out)``         ``lora_A.weight = Bᵀ (r, in)``,
                                         ``lora_B.weight = Aᵀ (out, r)`` (transposed;
                                         PEFT's ``fan_in_fan_out=True``)
DoRA (Linear,      ``m: (out,)``         ``lora_magnitude_vector``: ``(out,)`` for Linear,
Conv)                                    ``(1, out, 1, ...)`` for Conv
=================  ====================  ==================================================
"""

from __future__ import annotations

import math
import re
from typing import Optional

import torch
from torch import fx, nn

from ..ops import MERGE_OPS, dequantized
from ..state import PISSA_BUFFERS

__all__ = ["peft_kind", "expected_shapes", "to_peft", "from_peft", "pattern_key", "peft_suffix_match",
           "peft_factors", "LORA_SUFFIXES"]

#: Tensor names of one PEFT LoRA layer (after PEFT removed the adapter name from its keys).
LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

_EXPORTED_KINDS = {"Linear": "linear", "Embedding": "embedding", "Conv1d": "conv", "Conv2d": "conv",
                   "Conv3d": "conv", "Conv1D": "conv1d_gpt2"}


#: The op consuming a captured leaf's own ``weight``, and where: ``(PEFT kind, weight argument index)``.
_LEAF_OPS = {"linear": ("linear", 1), "embedding": ("embedding", 0), "addmm": ("conv1d_gpt2", 2),
             "conv1d": ("conv", 1), "conv2d": ("conv", 1), "conv3d": ("conv", 1), "convolution": ("conv", 1)}


def _weight_attr(node):
    """The ``get_attr`` node a weight argument reads, through lora_fx's merges (or None)."""
    while isinstance(node, fx.Node) and node.op == "call_function" and (node.target in MERGE_OPS
                                                                        or node.target is dequantized):
        node = node.args[0]
    return node if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _exported_kind(module: fx.GraphModule) -> Optional[str]:
    """Kind of a captured leaf: a ``GraphModule`` carrying the class name of an ``nn.Linear`` /
    ``Embedding`` / ``ConvNd`` / GPT-2 ``Conv1D`` (as the torch.export front-end makes), whose graph
    agrees: its one weight-consuming op reads the leaf's own ``weight`` (convolutions: ungrouped,
    not transposed)."""
    found = []
    for node in module.graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", "")
        if name not in _LEAF_OPS:
            continue
        kind, slot = _LEAF_OPS[name]
        w = _weight_attr(node.args[slot]) if len(node.args) > slot else None
        if w is None or w.target != "weight":
            return None
        if kind == "conv":
            if name == "convolution":
                groups, transposed = (node.args[8] if len(node.args) > 8 else 1), (len(node.args) > 6 and node.args[6])
            else:
                groups, transposed = (node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)), False
            if groups != 1 or transposed:
                return None
        found.append(kind)
    return found[0] if len(found) == 1 and _EXPORTED_KINDS.get(type(module).__name__) == found[0] else None


def peft_kind(module: nn.Module) -> Optional[str]:
    """PEFT layer family of ``module`` (``"linear"``, ``"conv"``, ``"embedding"``,
    ``"conv1d_gpt2"``), or None when PEFT's LoRA does not cover it."""
    if isinstance(module, fx.GraphModule):
        return _exported_kind(module)
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv" if module.groups == 1 else None
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers."):
        return "conv1d_gpt2"
    return None


def expected_shapes(kind: str, shape: tuple, r: int, dora: bool) -> dict[str, tuple]:
    """PEFT tensor names → shapes for a module of ``kind`` with weight ``shape`` and rank ``r``."""
    if kind == "linear":
        out = {"lora_A.weight": (r, shape[1]), "lora_B.weight": (shape[0], r)}
        mag = (shape[0],)
    elif kind == "conv":
        out = {"lora_A.weight": (r,) + tuple(shape[1:]), "lora_B.weight": (shape[0], r) + (1,) * (len(shape) - 2)}
        mag = (1, shape[0]) + (1,) * (len(shape) - 2)
    elif kind == "embedding":
        out = {"lora_embedding_A": (r, shape[0]), "lora_embedding_B": (shape[1], r)}
        mag = None
    else:  # conv1d_gpt2, W: (in, out)
        out = {"lora_A.weight": (r, shape[0]), "lora_B.weight": (shape[1], r)}
        mag = None
    if dora:
        out["lora_magnitude_vector"] = mag
    return out


def to_peft(kind: str, a: torch.Tensor, b: torch.Tensor, shape: tuple) -> dict[str, torch.Tensor]:
    """Our ``(A, B)`` → PEFT's tensors for a module of ``kind`` with weight ``shape``."""
    r = a.shape[0]
    if kind == "linear":
        return {"lora_A.weight": a, "lora_B.weight": b}
    if kind == "conv":
        return {"lora_A.weight": a.reshape((r,) + tuple(shape[1:])),
                "lora_B.weight": b.reshape((shape[0], r) + (1,) * (len(shape) - 2))}
    if kind == "embedding":
        return {"lora_embedding_A": b.t(), "lora_embedding_B": a.t()}
    return {"lora_A.weight": b.t(), "lora_B.weight": a.t()}


def from_peft(kind: str, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT tensors → our ``(A, B)``."""
    if kind == "linear":
        return t["lora_A.weight"], t["lora_B.weight"]
    if kind == "conv":
        a, b = t["lora_A.weight"], t["lora_B.weight"]
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    if kind == "embedding":
        return t["lora_embedding_B"].t(), t["lora_embedding_A"].t()
    return t["lora_B.weight"].t(), t["lora_A.weight"].t()


def pattern_key(patterns: dict, name: str):
    """PEFT's rule (``peft.utils.other.get_pattern_key``): the value of the first key ``k`` with
    ``re.match(rf"(.*\\.)?({k})$", name)``, or None."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def peft_suffix_match(module_name: str, names) -> bool:
    """PEFT's ``modules_to_save`` rule (``peft.utils.other._set_trainable``): a module is wrapped
    when its name ends with one of ``names`` (a plain string suffix)."""
    return any(module_name.endswith(n) for n in names)


def peft_factors(adapter: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """``(A, B, r, lora_alpha)`` such that PEFT's ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA)
    times ``B @ A`` is the adapter's update at its mixing weight, exactly:

    * zero padding beyond the logical rank (:func:`lora_fx.reserve_rank_`, a lower-rank load) is
      dropped; non-zero padding is kept, with ``r`` the capacity and ``lora_alpha`` rescaled;
    * a fused adapter (per-block pairs) becomes one rank-``n·r`` pair with a block-diagonal ``B``
      (rows of disabled blocks zero);
    * a PiSSA adapter becomes PEFT's PiSSA-to-LoRA conversion ``[B, -B0] @ [A; A0]`` of rank
      ``r + r0``, which applies to the original weight;
    * the mixing weight (``set_scale_``, ``set_adapter_weights``) is folded into ``lora_alpha``
      (a negative one into the sign of ``B``).  The enabled flag is not: PEFT activates what it loads.

    The caller refuses DoRA with a mixing weight other than 1 and a zero mixing weight.
    """
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()
    rank, alpha, rs, mix = int(adapter.rank), float(adapter.alpha), bool(adapter.use_rslora), float(adapter.mix)
    if adapter.blocks is not None:
        rows = [(n, on) for _, n, on in adapter.blocks]
        full = b.new_zeros(sum(n for n, _ in rows), a.shape[0])
        r0, c0, i = 0, 0, 0
        for n, on in rows:
            if on:
                full[r0:r0 + n, i * rank:(i + 1) * rank] = b[c0:c0 + n]
                c0 += n
                i += 1
            r0 += n
        b = full
    elif a.shape[0] > rank and bool((a[rank:] == 0).all()) and bool((b[:, rank:] == 0).all()):
        a, b = a[:rank], b[:, :rank]
    if hasattr(adapter, PISSA_BUFFERS[0]):  # W_res + s·B@A = W + s·[B, -B0] @ [A; A0] on the original W
        a0, b0 = (getattr(adapter, n) for n in PISSA_BUFFERS)
        a, b = torch.cat([a, a0.to(a.dtype)]), torch.cat([b, -b0.to(b.dtype)], dim=1)
    if mix < 0:
        b, mix = -b, -mix
    r = int(a.shape[0])
    if r == rank:
        return a, b, r, alpha * mix
    s = adapter.base_scaling * mix
    return a, b, r, s * (math.sqrt(r) if rs else r)
