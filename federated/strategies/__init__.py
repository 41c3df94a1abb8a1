"""Aggregation rules for federated low-rank adapters, as pure functions over numpy arrays.

``aggregate`` is what the server calls: it takes flat ``{key: array}`` client updates, pairs
the A/B factors by name, applies the chosen rule to the pairs and a weighted mean to any other
tensor (e.g. a LoRA bias, MoS pools under FedIT).
"""

from __future__ import annotations

from collections.abc import Sequence

from federated.strategies.base import Arrays, Pairs, pair_keys, weighted_mean
from federated.strategies.fedit import fedit
from federated.strategies.ffa_lora import ffa_lora
from federated.strategies.flora import flora, stack_flat, stack_rounds
from federated.strategies.lora_fair import DEFAULT_REG, lora_fair

STRATEGIES: tuple[str, ...] = ("fedit", "flora", "ffa-lora", "lora-fair")
# Which adapter methods each rule is defined for. FLoRA merges B @ A into the base, which only
# plain LoRA survives unchanged; LoRA-FAIR needs true B @ A pairs (MoS pools are not).
SUPPORTED_METHODS: dict[str, tuple[str, ...]] = {
    "fedit": ("lora", "mos", "hydra"),
    "ffa-lora": ("lora", "mos", "hydra"),
    "lora-fair": ("lora", "hydra"),
    "flora": ("lora",),
}

__all__ = [
    "DEFAULT_REG",
    "STRATEGIES",
    "SUPPORTED_METHODS",
    "aggregate",
    "check_supported",
    "fedit",
    "ffa_lora",
    "flora",
    "lora_fair",
    "stack_flat",
    "stack_rounds",
]


def check_supported(strategy: str, method: str) -> None:
    """ValueError naming the valid choices unless ``strategy`` applies to ``method``."""
    if strategy not in SUPPORTED_METHODS:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if method not in SUPPORTED_METHODS[strategy]:
        raise ValueError(
            f"strategy {strategy!r} does not support method {method!r}; "
            f"it supports {', '.join(SUPPORTED_METHODS[strategy])}"
        )


def _split(update: Arrays, pairs: dict[str, tuple[str, str]]) -> Pairs:
    return {name: (update[a], update[b]) for name, (a, b) in pairs.items()}


def aggregate(
    strategy: str,
    updates: Sequence[Arrays],
    weights: Sequence[float],
    reg: float = DEFAULT_REG,
) -> Arrays:
    """The aggregated flat update; all updates must carry the same keys (see validation)."""
    if not updates:
        raise ValueError("no client updates to aggregate")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if strategy == "ffa-lora":
        # Clients send B factors (and unpaired tensors) only: a weighted mean of everything.
        return ffa_lora(updates, weights)
    keys = list(updates[0])
    pairs = pair_keys(keys)
    paired = {k for ab in pairs.values() for k in ab}
    out: Arrays = {
        k: weighted_mean([u[k] for u in updates], weights) for k in keys if k not in paired
    }
    split = [_split(u, pairs) for u in updates]
    if strategy == "fedit":
        merged = fedit(split, weights)
    elif strategy == "flora":
        merged = flora(split, weights)
    else:
        merged = lora_fair(split, weights, reg)
    for name, (a_key, b_key) in pairs.items():
        out[a_key], out[b_key] = merged[name]
    return out
