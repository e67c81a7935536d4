"""The runnable code on the "Quantized bases (QLoRA)" docs page (blocks marked ``<!-- qlora-example -->``;
the Hugging Face block is examples/qlora_llama.py, tested in test_examples.py) runs as written and
prints what the page says."""

from __future__ import annotations

import contextlib
import io
import os
import re

from _quantized import quiet_import

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "qlora.md")


def test_qlora_page_examples_run_and_print_what_they_say(tmp_path, monkeypatch):
    quiet_import("torchao")
    monkeypatch.chdir(tmp_path)
    with open(PAGE) as f:
        blocks = re.findall(r"<!-- qlora-example -->\n```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks
    namespace = {"__name__": "docs_qlora"}
    for block in blocks:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, PAGE, "exec"), namespace)
        printed = [line.strip() for line in out.getvalue().splitlines()]
        for want in re.findall(r"^# (.*)$", block, flags=re.M):
            assert want.strip() in printed, (want, printed)
