"""A fast torch.compile backend that shows what compiled training saves for backward.

Real torch.compile (Dynamo + AOTAutograd, forward and backward) with the min-cut partitioner
Inductor uses; the partitioned graphs run as they are (no Inductor code generation).  The stock
``aot_eager`` backend uses the default partitioner, which recomputes nothing, so it could not show a
recomputation saving.  The saved activations are read from the partitioner's output: the backward
graph's inputs that are neither parameters nor gradients.
"""

from __future__ import annotations

import torch
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func
from torch._functorch.partitioners import min_cut_rematerialization_partition

__all__ = ["saving_backend"]


def saving_backend(saved: list):
    """AOTAutograd + min-cut partitioner; appends the saved activation bytes of each compiled graph."""

    def partition(joint, inputs, **kw):
        fw, bw = min_cut_rematerialization_partition(joint, inputs, **kw)
        vals = [n.meta.get("val") for n in bw.graph.nodes
                if n.op == "placeholder" and not n.name.startswith(("tangents", "primals"))]
        saved.append(sum(v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor)))
        return fw, bw

    boxed = lambda gm, _: make_boxed_func(gm)  # noqa: E731
    return aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition)
