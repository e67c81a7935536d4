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

__all__ = ["close_tol", "assert_close", "assert_not_close", "differs", "EXACT"]

#: Per-dtype default: how many units in the last place of the largest magnitude a comparison allows.
ULPS = {torch.float64: 1024, torch.float32: 256, torch.bfloat16: 8, torch.float16: 16}
#: ``assert_close(..., **EXACT)``: bit-equal.
EXACT = dict(ulps=0)


def close_tol(expected: torch.Tensor, dtype: torch.dtype | None = None, ulps: float | None = None,
              scale: float | None = None) -> dict:
    """``{"atol": ..., "rtol": ...}`` for ``torch.testing.assert_close`` against ``expected``.

    Args:
        expected: the reference tensor (its magnitude sets the absolute tolerance).
        dtype: the dtype the *computation* ran in (default: ``expected.dtype``); bf16 math compared
            in fp32 still gets bf16's epsilon.
        ulps: units of ``eps(dtype)`` allowed relative to ``max |expected|`` (default per dtype).
        scale: the magnitude of the largest *term* that was summed, where it exceeds the result's
            (a difference of nearly equal values, e.g. ``W - W_principal``); default ``max |expected|``.
    """
    dtype = dtype or expected.dtype
    if not dtype.is_floating_point:
        return dict(atol=0, rtol=0)
    ulps = ULPS.get(dtype, 256) if ulps is None else ulps
    eps = torch.finfo(dtype).eps
    e = expected.detach()
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    scale = max(float(scale), 1e-3)
    return dict(atol=ulps * eps * scale, rtol=ulps * eps)


def assert_close(actual, expected, *, dtype: torch.dtype | None = None, ulps: float | None = None, msg=None,
                 scale: float | None = None):
    """``torch.testing.assert_close`` with :func:`close_tol` tolerances; compares in ``expected``'s
    dtype promoted to at least fp32.  ``ulps=0`` demands bit equality (and equal dtypes).  Tuples,
    lists and dicts are compared element by element (each against its own magnitude)."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), (type(actual), msg)
        for k in expected:
            assert_close(actual[k], expected[k], dtype=dtype, ulps=ulps, msg=msg or str(k), scale=scale)
        return
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), (type(actual), msg)
        for a, e in zip(actual, expected):
            assert_close(a, e, dtype=dtype, ulps=ulps, msg=msg, scale=scale)
        return
    if ulps == 0:
        assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
        assert torch.equal(actual, expected), msg or f"not bit-equal: max |Δ| {(actual.double() - expected.double()).abs().max():.3g}"
        return
    dtype = dtype or expected.dtype
    wide = torch.promote_types(expected.dtype, torch.float32) if expected.is_floating_point() else expected.dtype
    torch.testing.assert_close(actual.to(wide), expected.to(wide), **close_tol(expected, dtype, ulps, scale), msg=msg)


def differs(actual, expected, *, dtype: torch.dtype | None = None, factor: float = 100.0) -> bool:
    """Whether ``actual`` differs from ``expected`` by far more than rounding: somewhere by more
    than ``factor`` times the absolute tolerance :func:`assert_close` would allow."""
    tol = close_tol(expected, dtype)
    err = float((actual.detach().double() - expected.detach().double()).abs().max()) if expected.numel() else 0.0
    return err > factor * tol["atol"]


def assert_not_close(actual, expected, *, dtype: torch.dtype | None = None, factor: float = 100.0, msg=None):
    """:func:`differs` as an assertion (a change that must show, e.g. an adapter that acted, cannot
    pass as noise)."""
    if not differs(actual, expected, dtype=dtype, factor=factor):
        err = float((actual.detach().double() - expected.detach().double()).abs().max()) if expected.numel() else 0.0
        raise AssertionError(msg or f"max |Δ| {err:.3g} is within {factor:g}x rounding "
                                    f"({close_tol(expected, dtype)['atol']:.3g})")
