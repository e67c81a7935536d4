"""Site report of the digits ConvNet (examples/finetune_digits.py): print the table of adapted
sites and draw the adapted graph (the picture in the README, docs/digits_graph.png).

``python examples/site_report.py [--out docs/digits_graph.png] [--width 32] [--rank 8]``;
the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

import lora_fx

HERE = Path(__file__).resolve().parent


def _convnet(width: int):
    spec = importlib.util.spec_from_file_location("finetune_digits", HERE / "finetune_digits.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ConvNet(width)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--out", type=Path, default=HERE.parent / "docs" / "digits_graph.png")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    gm = lora_fx.transform(_convnet(args.width), rank=args.rank, alpha=args.alpha)
    table = lora_fx.summary(gm)
    path = lora_fx.draw(gm, args.out, title=f"digits ConvNet (width {args.width}) after "
                                             f"lora_fx.transform(rank={args.rank})")
    result = {"sites": len(table.rows), "adapter_params": table.adapter_params,
              "total_params": table.total_params, "picture": str(path), "picture_bytes": path.stat().st_size}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
