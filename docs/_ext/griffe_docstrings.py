"""Griffe extension for the API reference: reads lora_fx's docstrings as they are written.

lora_fx's docstrings are Google style with two habits mkdocstrings does not read by itself:

* Sphinx roles (``:func:`lora_fx.transform```, ``:class:`~lora_fx.config.LoraConfig```): each
  becomes a link when its target is documented in the API reference (a public ``lora_fx.*``
  name, or a member of ``lora_fx.nn`` / ``lora_fx.io`` / ``lora_fx.distributed``), otherwise
  inline code.  A ``~`` shows only the last component, as in Sphinx.
* One entry for several names in ``Args:`` / ``Attributes:`` (``rank, alpha: ...``, possibly
  spread over lines, or ``a / b: ...``): split into one entry per name with the same text.

``lora_fx.passes`` is installed from the top-level ``passes/`` folder (a package-dir mapping),
which static analysis of ``lora_fx/`` cannot see: it is loaded under that name, so that public names
re-exported from it resolve.

Signatures: a keyword whose default is the sentinel ``_UNSET`` ("take the value from ``config``")
shows the default ``config.<name>``.

Runs on griffe's static analysis only: nothing of lora_fx is imported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from griffe import Extension

__all__ = ["LoraFxDocstrings"]

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`]+)`")
_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Attributes|Other Parameters):\s*$")
_NAMES = r"\**[A-Za-z_]\w*(?:\s*(?:,|/)\s*\**[A-Za-z_]\w*)*"
_ENTRY = re.compile(rf"^({_NAMES})\s*:(.*)$")
_OPEN_NAMES = re.compile(rf"^{_NAMES}\s*,\s*$")
# The modules whose members the API reference documents (lora_fx's own: every name in __all__).
_DOCUMENTED_MODULES = ("lora_fx", "lora_fx.nn", "lora_fx.io", "lora_fx.distributed")


class LoraFxDocstrings(Extension):
    """Rewrites the docstrings of package ``lora_fx`` once it is loaded (see the module docstring)."""

    def on_package(self, *, pkg: Any, loader: Any, **kwargs: Any) -> None:
        if pkg.path != "lora_fx":
            return
        passes = Path(pkg.filepath).parent.parent / "passes"
        if "passes" not in pkg.members and (passes / "__init__.py").is_file():
            # griffe's loader API has no public call for "load this folder as that submodule"
            pkg.set_member("passes", loader._load_module("passes", passes / "__init__.py", parent=pkg))
        self._collection = loader.modules_collection
        self._public = self._public_ids()
        for obj in _walk(pkg):
            for param in getattr(obj, "parameters", None) or ():
                if str(param.default) == "_UNSET":
                    param.default = f"config.{param.name}"
            if obj.docstring is not None:
                text = _split_grouped_entries(obj.docstring.value)
                obj.docstring.value = _ROLE.sub(lambda m, o=obj: self._role(m, o), text)

    def _public_ids(self) -> dict[str, str]:
        """``{canonical path: documented id}`` for every object the API reference renders."""
        ids: dict[str, str] = {}
        for mod_path in _DOCUMENTED_MODULES:
            mod = self._collection[mod_path]
            ids.setdefault(mod.path, mod_path)
            for name in mod.exports or ():
                target = self._canonical(f"{mod_path}.{name}")
                if target is not None and (self._collection[target].is_module and target not in ids):
                    continue  # a submodule the reference does not render (lora_fx.nn.layout)
                if target is not None:
                    ids.setdefault(target, f"{mod_path}.{name}")  # lora_fx.X wins over lora_fx.nn.X
                    ids.setdefault(f"{mod_path}.{name}", f"{mod_path}.{name}")
        return ids

    def _canonical(self, path: str) -> str | None:
        try:
            obj = self._collection[path]
            return obj.final_target.path if obj.is_alias else obj.path
        except Exception:  # not in lora_fx, or an alias to a package griffe did not load (torch, ...)
            return None

    def _role(self, match: re.Match, obj: Any) -> str:
        short, target = match.group(1), match.group(2).strip()
        shown = target.rsplit(".", 1)[-1] if short else target
        scopes = [obj.path, obj.parent.path if obj.parent else "", obj.module.path, "lora_fx"]
        for scope in [""] + scopes:
            path = target.lstrip(".") if not scope else f"{scope}.{target.lstrip('.')}"
            canonical = self._canonical(path)
            if canonical in self._public:
                return f"[`{shown}`][{self._public[canonical]}]"
        return f"`{shown}`"


def _walk(obj: Any):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _split_grouped_entries(text: str) -> str:
    """``a, b: text`` entries of name sections become ``a: text`` and ``b: text``."""
    lines, out, i = text.split("\n"), [], 0
    section_indent = entry_indent = None
    while i < len(lines):
        line = lines[i]
        head = _SECTION.match(line)
        if head:
            section_indent, entry_indent = len(head.group(1)), None
            out.append(line)
            i += 1
            continue
        indent = len(line) - len(line.lstrip())
        if section_indent is not None and line.strip() and indent <= section_indent:
            section_indent = None  # the section ended
        if section_indent is None or not line.strip():
            out.append(line)
            i += 1
            continue
        if entry_indent is None:
            entry_indent = indent
        if indent != entry_indent:
            out.append(line)
            i += 1
            continue
        # an entry line: gather a name list that continues on deeper-indented lines
        stem, j = line.strip(), i
        while _OPEN_NAMES.match(stem) and j + 1 < len(lines):
            j += 1
            stem = f"{stem} {lines[j].strip()}"
        entry = _ENTRY.match(stem)
        if not entry:
            out.append(line)
            i += 1
            continue
        names = [n.strip() for n in re.split(r"[,/]", entry.group(1))]
        j += 1
        body = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > entry_indent):
            body.append(lines[j])
            j += 1
        while body and not body[-1].strip():
            j -= 1
            body.pop()
        for name in names:
            out.append(f"{' ' * entry_indent}{name}:{entry.group(2)}")
            out.extend(body)
        i = j
    return "\n".join(out)
