"""Percentiles shared by the benchmarks (linear interpolation, NaN for no samples)."""

from __future__ import annotations


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``xs``, interpolating linearly between samples."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
