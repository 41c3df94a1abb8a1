"""FFA-LoRA: A frozen at a shared seeded init, only B trained and averaged (Sun et al., 2024).

Every client builds the same A from the run's seed, so ``avg(B) @ A = Σ w_k B_k A`` exactly,
and only B travels (half of LoRA's bytes).
"""

from __future__ import annotations

from collections.abc import Sequence

from federated.strategies.base import Arrays, weighted_mean


def ffa_lora(b_updates: Sequence[Arrays], weights: Sequence[float]) -> Arrays:
    """Per B key, ``Σ w_k B_k``; the frozen A factors never leave the clients."""
    return {key: weighted_mean([u[key] for u in b_updates], weights) for key in b_updates[0]}
