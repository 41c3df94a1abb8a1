"""Shared types and helpers of the aggregation rules.

An update is a flat ``{tensor key: array}`` dict. Low-rank factors are paired by name
(``…lora_A.weight``/``…lora_B.weight``, ``…_A``/``…_B``, ``…A``/``…B``); every rule works on
per-pair ``(A [r, d_in], B [d_out, r])`` so that ``B @ A`` is the module's update.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Arrays = dict[str, np.ndarray]
Pair = tuple[np.ndarray, np.ndarray]
Pairs = dict[str, Pair]

# (A marker, B marker) suffixes in the order they are tried; LoRA's PEFT keys first.
_MARKERS: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", ".lora_B.weight"),
    ("_A", "_B"),
    (".A", ".B"),
)


def b_key_of(a_key: str) -> str | None:
    """The B key paired with ``a_key``, or None if ``a_key`` is no A factor."""
    for a_mark, b_mark in _MARKERS:
        if a_key.endswith(a_mark):
            return a_key[: -len(a_mark)] + b_mark
    return None


def pair_keys(keys: Sequence[str]) -> dict[str, tuple[str, str]]:
    """``{pair name: (A key, B key)}`` for every A key whose B partner is also present."""
    present = set(keys)
    out: dict[str, tuple[str, str]] = {}
    for key in sorted(present):
        b_key = b_key_of(key)
        if b_key is not None and b_key in present:
            out[key] = (key, b_key)
    return out


def is_a_key(key: str) -> bool:
    return b_key_of(key) is not None


def normalize_weights(weights: Sequence[float]) -> np.ndarray:
    """Weights as float64 summing to one; ValueError on empty, negative or all-zero weights."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError("need at least one weight")
    if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: {w.tolist()}")
    return w / w.sum()


def weighted_mean(arrays: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """``Σ w_k x_k`` in float64, returned in the first array's dtype."""
    w = normalize_weights(weights)
    total = sum(wk * np.asarray(x, dtype=np.float64) for wk, x in zip(w, arrays, strict=True))
    return np.asarray(total, dtype=arrays[0].dtype)


def ideal_delta(updates: Sequence[Pairs], weights: Sequence[float], name: str) -> np.ndarray:
    """``ΔW_ideal = Σ w_k B_k A_k`` of one module, in float64."""
    w = normalize_weights(weights)
    return sum(
        wk * (u[name][1].astype(np.float64) @ u[name][0].astype(np.float64))
        for wk, u in zip(w, updates, strict=True)
    )
