"""The code of the "Extending" docs page runs as written and prints what the page says.

The same examples are tested in depth in tests/test_rules_registry.py, tests/test_weights_seam.py and
tests/test_io_formats.py; this file keeps the page itself from rotting.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "extending.md")


def _sections() -> dict[str, list[str]]:
    with open(PAGE) as f:
        text = f.read()
    out = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title = part.splitlines()[0]
        out[title] = re.findall(r"```python\n(.*?)```", part, flags=re.S)
    return out


@pytest.mark.skipif(not os.path.exists(PAGE), reason="docs/extending.md not in this checkout")
@pytest.mark.parametrize("title", sorted(_sections()) if os.path.exists(PAGE) else [])
def test_extending_page_section_runs(title, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_example_{abs(hash(title))}"}
    for block in _sections()[title]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block, f"{PAGE}:{title}", "exec"), namespace)
        expected = [m.group(1) for m in re.finditer(r"^# (.*)$", block, flags=re.M)
                    if "print(" in block and not m.group(1).startswith(("the ", "fold_into", "linear in"))]
        printed = out.getvalue().splitlines()
        want = [line for line in expected if any(ch in line for ch in "{('")]
        for line in want:
            pattern = re.escape(line.strip()).replace(r"\.\.\.", ".*")
            assert any(re.fullmatch(pattern, p.strip()) for p in printed), (line, printed)
