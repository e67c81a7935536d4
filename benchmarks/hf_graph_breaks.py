"""Where ``torch.compile`` breaks the graph of adapted Hugging Face models, next to the plain models.

For each tiny model of the test suite (``tests/_hf.py``: default configs, random weights),
``torch._dynamo.explain`` of the plain model and of ``lora_fx.transform(model, rank=4,
targets=<its attention and MLP projections>)`` on the same inputs: graphs, graph breaks and the
break reasons.  Not a timing: a table for the docs.

    python benchmarks/hf_graph_breaks.py [names ...]
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
sys.path.insert(0, os.path.dirname(HERE))

import lora_fx  # noqa: E402
from _hf import NAMES, inputs, targets, tiny  # noqa: E402


def explain(model, kw):
    torch._dynamo.reset()
    e = torch._dynamo.explain(model)(**kw)
    reasons = sorted({str(b.reason).splitlines()[0][:100] for b in e.break_reasons})
    return e.graph_count, e.graph_break_count, reasons


def main(names):
    warnings.simplefilter("ignore")
    print("| model | plain: graphs / breaks | adapted: graphs / breaks | break reasons (adapted) |")
    print("|---|---|---|---|")
    for name in names:
        model = tiny(name)
        gm = lora_fx.transform(model, rank=4, targets=targets(name))
        kw = inputs(name)
        plain, ours = explain(model, kw), explain(gm, kw)
        print(f"| {name} | {plain[0]} / {plain[1]} | {ours[0]} / {ours[1]} | {'; '.join(ours[2]) or '-'} |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or NAMES)
