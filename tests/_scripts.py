"""Load a script of the repository's ``examples/`` or ``benchmarks/`` as a module (they are not a
package the tests can import), to call its ``main(argv)`` at a small size."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

__all__ = ["load_script"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(folder: str, name: str) -> ModuleType:
    """``folder/name.py`` (``folder``: ``"examples"`` or ``"benchmarks"``) executed as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, folder, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
