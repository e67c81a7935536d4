"""Timing and statistics of the benchmark: interleaved rounds, paired ratios, bootstrap intervals.

A shared CPU drifts by 15–30 % between rounds, and a drift hits every variant of one round alike.
So variants are compared as *paired* ratios: round ``i``'s time of variant ``a`` over round ``i``'s
time of variant ``b``.  The reported ratio is the median of those per-round ratios; its 95 %
interval is a percentile bootstrap of that median (resampling the rounds, seeded, so the same
timings always give the same interval).  The half-width of an interval is the difference the run
can resolve for that pair: :func:`resolution` is the median half-width over the pairs of a table.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import Callable

__all__ = ["CLOCK", "run_rounds", "paired", "paired_ratio", "bootstrap_ci", "resolution"]

#: clock of the figures: "cpu" = CPU time of this process (with 1 thread: the work done, robust to
#: other processes sharing the cores), "wall" = elapsed time.  Both are recorded.
CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}


def _timed(fn, n):
    c, w = time.process_time(), time.perf_counter()
    for _ in range(n):
        fn()
    return (time.process_time() - c) / n, (time.perf_counter() - w) / n


def run_rounds(fns: dict[str, Callable[[], None]], rounds: int, steps: int, clock: str = "cpu") -> dict[str, dict]:
    """Time every variant once per round; round ``i`` starts at variant ``i`` (rotated order, so no
    variant always runs first or right after a compilation-heavy neighbour).  Each result has the
    per-round times ``rounds_ms`` (for :func:`paired`), ``median_ms``, ``spread`` (``(max - min) /
    median``) and ``wall_median_ms``."""
    times: dict[str, list] = {k: [] for k in fns}
    names = list(fns)
    for i in range(rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            times[name].append(_timed(fns[name], steps))
    out = {}
    for k, ts in times.items():
        vals = [1e3 * (t[0] if clock == "cpu" else t[1]) for t in ts]
        med = statistics.median(vals)
        out[k] = {"median_ms": med, "spread": (max(vals) - min(vals)) / med if med else 0.0, "n": len(vals),
                  "wall_median_ms": 1e3 * statistics.median(t[1] for t in ts), "rounds_ms": vals}
    return out


def bootstrap_ci(values: list[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values`` (seeded: deterministic)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return meds[int(tail * resamples)], meds[min(resamples - 1, int((1 - tail) * resamples))]


def paired(res: dict, name: str, ref: str) -> dict:
    """``{"ratio", "ci95", "best", "spread"}`` of ``name / ref`` over the rounds of one run: the median
    of the per-round ratios, its bootstrap interval, the ratio of the fastest rounds (timeit's
    estimator: interference only adds time), and the range of the per-round ratios."""
    rs = [a / b for a, b in zip(res[name]["rounds_ms"], res[ref]["rounds_ms"])]
    lo, hi = bootstrap_ci(rs)
    return {"ratio": statistics.median(rs), "ci95": [lo, hi], "best": min(res[name]["rounds_ms"]) / min(res[ref]["rounds_ms"]),
            "spread": max(rs) - min(rs)}


def paired_ratio(res: dict, name: str, ref: str) -> tuple[float, float]:
    """Median and spread (max - min) of the per-round ratios ``name / ref`` (the short form of
    :func:`paired`, without the interval)."""
    p = paired(res, name, ref)
    return p["ratio"], p["spread"]


def resolution(pairs: list[dict]) -> float:
    """Median half-width of the intervals of ``pairs`` (results of :func:`paired`), relative to their
    ratios: the relative difference this run resolves."""
    widths = [(p["ci95"][1] - p["ci95"][0]) / 2 / p["ratio"] for p in pairs if p["ratio"]]
    return statistics.median(widths) if widths else float("nan")
