"""The docs stay honest: README examples run, links resolve, the API reference covers ``lora_fx.__all__``,
and no page speaks of the project's internal history.  (``make docs`` builds the site with ``--strict``;
these checks are the cheap part that runs with the tests.)"""

import os
import re

import pytest

import lora_fx

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
RUNNABLE = re.compile(r"<!-- runnable -->\n```python\n(.*?)```", re.S)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _pages():
    return sorted(os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))


def _runnable_blocks():
    text = _read(README)
    return [(text[:m.start()].count("\n") + 2, m.group(1)) for m in RUNNABLE.finditer(text)]


def test_readme_is_a_front_door():
    text = _read(README)
    assert len(text.splitlines()) <= 250
    for command in ("make demo", "make test", "pip install .", "make docs"):
        assert command in text, command
    assert len(_runnable_blocks()) >= 2  # the plain-PyTorch and the Hugging Face example


@pytest.mark.parametrize("line, code", _runnable_blocks(), ids=[f"README.md:{n}" for n, _ in _runnable_blocks()])
def test_readme_example_runs(line, code, tmp_path, monkeypatch):
    if "transformers" in code:
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # examples write their files into the working directory
    exec(compile("\n" * (line - 1) + code, README, "exec"), {"__name__": "__readme__"})


# the internal case list (CASES, CASES.md, "case 8"), issue numbers, work sessions
HISTORY = re.compile(r"\bCASES\b|(?i:\bcase \d+\b|\bissues?\s*#?\d+|\bsessions?\b)")


@pytest.mark.parametrize("path", [README] + _pages(), ids=os.path.basename)
def test_no_internal_history(path):
    found = [f"{os.path.basename(path)}:{i}: {line.strip()}"
             for i, line in enumerate(_read(path).splitlines(), 1) if HISTORY.search(line)]
    assert not found, "user docs speak of the library, not of how it was made:\n" + "\n".join(found)


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", _read(README)):
        if not re.match(r"[a-z]+://", target):
            assert os.path.exists(os.path.join(ROOT, target)), target


def test_every_page_is_in_the_nav():
    nav = set(re.findall(r":\s*([\w./-]+\.md)\s*$", _read(os.path.join(ROOT, "mkdocs.yml")), re.M))
    pages = {os.path.basename(p) for p in _pages()}
    assert pages == nav, f"not in nav: {sorted(pages - nav)}; missing files: {sorted(nav - pages)}"


def test_api_reference_covers_the_public_names():
    documented = set(re.findall(r"^::: ([\w.]+)", _read(os.path.join(DOCS, "api.md")), re.M))
    missing = [n for n in lora_fx.__all__ if f"lora_fx.{n}" not in documented]
    assert not missing, f"docs/api.md lacks ::: entries for {missing}"
    for module in ("lora_fx.nn", "lora_fx.io", "lora_fx.distributed"):
        assert module in documented
