"""Checks every client update passes before it is aggregated.

A rejected update is dropped from the round and logged with the reason; the round goes on
with the others. Checks: exactly the expected keys, the expected shapes, finite values and
a bounded L2 norm (an update far larger than any honest local training is a bug or an attack).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

DEFAULT_MAX_NORM = 1e3


class UpdateRejected(ValueError):
    """A client update that must not be aggregated; the message says why."""


def validate_update(
    update: Mapping[str, np.ndarray],
    expected_shapes: Mapping[str, tuple[int, ...]],
    max_norm: float = DEFAULT_MAX_NORM,
) -> None:
    """Raise UpdateRejected unless ``update`` matches ``expected_shapes`` and is sane."""
    missing = sorted(set(expected_shapes) - set(update))
    unexpected = sorted(set(update) - set(expected_shapes))
    if missing or unexpected:
        raise UpdateRejected(f"wrong keys: missing {missing[:3]}, unexpected {unexpected[:3]}")
    total = 0.0
    for key, want in expected_shapes.items():
        value = update[key]
        if not isinstance(value, np.ndarray) or value.dtype.kind != "f":
            kind = getattr(value, "dtype", type(value))
            raise UpdateRejected(f"{key}: expected a float array, got {kind}")
        if tuple(value.shape) != tuple(want):
            raise UpdateRejected(f"{key}: shape {list(value.shape)}, expected {list(want)}")
        if not np.isfinite(value).all():
            raise UpdateRejected(f"{key}: contains NaN or Inf")
        total += float(np.square(value, dtype=np.float64).sum())
    norm = total ** 0.5
    if not norm <= max_norm:
        raise UpdateRejected(f"update norm {norm:.3g} exceeds the bound {max_norm:.3g}")
