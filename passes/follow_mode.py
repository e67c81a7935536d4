"""Mode-following rewrite: make an ATen graph exported in train mode follow ``self.training``.

An exported graph bakes the training flag of every op in.  The export front-end
(:mod:`.trace_export`) captures in **train mode** (the mode that records every dropout
probability) and this pass makes each op follow ``self.training`` of the ``GraphModule`` holding it:

* ``aten.dropout`` (and feature / alpha dropout): the ``train`` argument reads ``self.training``;
* ``aten.scaled_dot_product_attention``: ``dropout_p`` becomes ``p if self.training else 0``
  (what ``nn.MultiheadAttention`` and HF attention do in Python);
* ``aten.batch_norm`` with running statistics: ``training`` reads ``self.training``, and the
  ``num_batches_tracked += 1`` update only runs in training.
"""

from __future__ import annotations

import warnings

import torch
from torch import fx

__all__ = ["follow_mode_", "train_only", "add_if_training_"]

_aten = torch.ops.aten
_DROPOUTS = (_aten.dropout.default, _aten.feature_dropout.default, _aten.alpha_dropout.default,
             _aten.feature_alpha_dropout.default)
_SDPA = _aten.scaled_dot_product_attention.default
_BATCH_NORM = _aten.batch_norm.default


def train_only(p: float, training: bool) -> float:
    """``p`` in training, ``0.0`` in eval: the attention-dropout probability the graph passes to
    ``scaled_dot_product_attention`` (``training`` is the holding module's ``self.training``)."""
    return p if training else 0.0


def add_if_training_(counter: torch.Tensor, training: bool) -> torch.Tensor:
    """``counter += 1`` in training only (batch-norm ``num_batches_tracked``); returns ``counter``."""
    return counter.add_(1) if training else counter


def _training(graph: fx.Graph, cache: dict, before: fx.Node) -> fx.Node:
    node = cache.get("training")
    if node is None:
        first = next(n for n in graph.nodes if n.op != "placeholder") if any(
            n.op != "placeholder" for n in graph.nodes) else before
        with graph.inserting_before(first), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx warns that a bool attribute is not a tensor/module
            node = cache["training"] = graph.get_attr("training")
    return node


def follow_mode_(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite ``gm``'s ATen graph (exported in train mode) so dropout, attention dropout and
    batch norm follow ``gm.training``; returns ``gm`` (modified in place)."""
    graph, cache, changed = gm.graph, {}, False
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPOUTS and len(node.args) == 3 and node.args[2] is True:
            node.update_arg(2, _training(graph, cache, node))
            changed = True
        elif node.target is _SDPA:
            p = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
            if isinstance(p, (int, float)) and p > 0:
                with graph.inserting_before(node):
                    gated = graph.call_function(train_only, (p, _training(graph, cache, node)))
                if len(node.args) > 4:
                    node.update_arg(4, gated)
                else:
                    node.update_kwarg("dropout_p", gated)
                changed = True
        elif node.target is _BATCH_NORM and len(node.args) > 5 and node.args[5] is True and node.args[3] is not None:
            node.update_arg(5, _training(graph, cache, node))
            changed = True
        elif (node.target is _aten.add_.Tensor and node.args[1] == 1 and isinstance(node.args[0], fx.Node)
              and node.args[0].op == "get_attr" and node.args[0].target.rpartition(".")[2] == "num_batches_tracked"):
            with graph.inserting_before(node):
                new = graph.call_function(add_if_training_, (node.args[0], _training(graph, cache, node)))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            changed = True
    if changed:
        graph.lint()
        gm.recompile()
    return gm
