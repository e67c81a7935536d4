"""Writing a benchmark's results: one JSON file per run (``--json PATH``), written atomically."""

from __future__ import annotations

import json
import os
import tempfile

__all__ = ["write_results"]


def write_results(path: str, res: dict) -> None:
    """Write ``res`` to ``path`` as indented JSON (values JSON cannot hold as their ``str``); a
    temporary file renamed into place, so an interrupted run leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json.tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
