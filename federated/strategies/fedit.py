"""FedIT: federated instruction tuning's plain FedAvg of A and of B, separately.

Inexact by construction: ``avg(B) @ avg(A) != Σ w_k B_k A_k`` once clients diverge. The
baseline every other rule is measured against.
"""

from __future__ import annotations

from collections.abc import Sequence

from federated.strategies.base import Pairs, weighted_mean


def fedit(updates: Sequence[Pairs], weights: Sequence[float]) -> Pairs:
    """Per module, ``(Σ w_k A_k, Σ w_k B_k)``."""
    return {
        name: (
            weighted_mean([u[name][0] for u in updates], weights),
            weighted_mean([u[name][1] for u in updates], weights),
        )
        for name in updates[0]
    }
