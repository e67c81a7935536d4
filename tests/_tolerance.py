"""Tolerances derived from dtype and magnitude, shared by every numeric comparison in the suite.

Two computations of the same function in floating point (factored vs merged weight, compiled vs
eager, another summation order) differ by rounding: each element by at most a few units in the
last place of the *largest* terms that were summed, not of the element itself.  So the bound is
``ulps · eps(dtype) · scale`` with ``scale = max |expected|`` (at least 1e-3 of the dtype's
range near 1, so all-zero references do not demand exact zeros), plus ``ulps · eps`` relative.
Nothing here is tuned to one random draw or one CPU: ``ulps`` says how many roundings a test
allows, and the same call works for fp64, fp32, bf16 and fp16.
"""

from __future__ import annotations

import torch

__all__ = ["close_tol", "assert_close", "EXACT"]

#: Per-dtype default: how many units in the last place of the largest magnitude a comparison allows.
ULPS = {torch.float64: 1024, torch.float32: 256, torch.bfloat16: 8, torch.float16: 16}
#: ``assert_close(..., **EXACT)``: bit-equal.
EXACT = dict(ulps=0)


def close_tol(expected: torch.Tensor, dtype: torch.dtype | None = None, ulps: float | None = None) -> dict:
    """``{"atol": ..., "rtol": ...}`` for ``torch.testing.assert_close`` against ``expected``.

    Args:
        expected: the reference tensor (its magnitude sets the absolute tolerance).
        dtype: the dtype the *computation* ran in (default: ``expected.dtype``); bf16 math compared
            in fp32 still gets bf16's epsilon.
        ulps: units of ``eps(dtype)`` allowed relative to ``max |expected|`` (default per dtype).
    """
    dtype = dtype or expected.dtype
    if not dtype.is_floating_point:
        return dict(atol=0, rtol=0)
    ulps = ULPS.get(dtype, 256) if ulps is None else ulps
    eps = torch.finfo(dtype).eps
    e = expected.detach()
    scale = float(e.abs().max()) if e.numel() else 0.0
    scale = max(scale, 1e-3)
    return dict(atol=ulps * eps * scale, rtol=ulps * eps)


def assert_close(actual, expected, *, dtype: torch.dtype | None = None, ulps: float | None = None, msg=None):
    """``torch.testing.assert_close`` with :func:`close_tol` tolerances; compares in ``expected``'s
    dtype promoted to at least fp32.  ``ulps=0`` demands bit equality (and equal dtypes)."""
    if ulps == 0:
        assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
        assert torch.equal(actual, expected), msg or f"not bit-equal: max |Δ| {(actual.double() - expected.double()).abs().max():.3g}"
        return
    dtype = dtype or expected.dtype
    wide = torch.promote_types(expected.dtype, torch.float32) if expected.is_floating_point() else expected.dtype
    torch.testing.assert_close(actual.to(wide), expected.to(wide), **close_tol(expected, dtype, ulps), msg=msg)
