"""Site report: lora_fx.summary table values and lora_fx.draw picture; the site_report example."""

import json
import os

import pytest
from torch import nn

import lora_fx
from lora_fx import NotAdaptedError

from _scripts import load_script

HERE = os.path.dirname(os.path.abspath(__file__))
PNG = b"\x89PNG\r\n\x1a\n"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_summary_rows_counts_and_text(capsys):
    gm = lora_fx.transform(Net(), rank=2)
    lora_fx.add_adapter(gm, "dora", rank=3, use_dora=True, targets=["fc.weight"])
    table = lora_fx.summary(gm)
    printed = capsys.readouterr().out
    assert printed.strip() == str(table)
    rows = {(r["site"], r["adapter"]): r for r in table.rows}
    assert set(rows) == {("conv.weight", "default"), ("fc.weight", "default"), ("fc.weight", "dora")}
    conv, fc, dora = rows["conv.weight", "default"], rows["fc.weight", "default"], rows["fc.weight", "dora"]
    assert conv["weight shape"] == (8, 3, 3, 3) and conv["op"] == "conv2d" and conv["rank"] == 2
    assert conv["trainable params"] == 2 * (27 + 8)
    assert fc["trainable params"] == 2 * (8 + 5) and fc["lowering"] == "factored"
    assert dora["trainable params"] == 3 * (8 + 5) + 5 and dora["lowering"] == "merge" and not dora["active"]
    total = sum(p.numel() for p in gm.parameters())
    assert table.total_params == total
    assert table.adapter_params == conv["trainable params"] + fc["trainable params"] + dora["trainable params"]
    assert abs(fc["share"] - fc["trainable params"] / total) < 1e-12
    for col in ("site", "op", "weight shape", "rank", "lowering", "trainable params", "share"):
        assert col in printed
    assert "8x3x3x3" in printed
    assert lora_fx.summary(gm, show=False).rows == table.rows
    with pytest.raises(NotAdaptedError):
        lora_fx.summary(Net())


def test_draw_writes_png_with_highlighted_sites(tmp_path):
    gm = lora_fx.transform(Net(), rank=2)
    path = lora_fx.draw(gm, tmp_path / "sub" / "g.png")
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    svg = lora_fx.draw(gm, tmp_path / "g.svg").read_text()
    assert "LoRA" in svg or "<svg" in svg
    with pytest.raises(lora_fx.ConfigError):
        lora_fx.draw(Net(), tmp_path / "x.png")


def test_site_report_example(tmp_path, capsys):
    mod = load_script("examples", "site_report")
    res = mod.main(["--width", "4", "--rank", "2", "--out", str(tmp_path / "digits.png")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last) == res
    assert res["sites"] == 4 and (tmp_path / "digits.png").read_bytes()[:8] == PNG
    assert os.path.exists(os.path.join(HERE, "..", "docs", "digits_graph.png"))
