"""Process memory of a benchmark child process (Linux ``/proc``): the resident set, its high-water
mark, and resetting the mark, so that one training step's peak can be read as ``peak − before``."""

from __future__ import annotations

__all__ = ["rss", "reset_peak"]


def rss() -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of this process in bytes: the resident set now and its high-water mark."""
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024


def reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident set (``/proc/self/clear_refs``, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
