"""LoRA-FAIR: server-side correction of B after averaging (Bian et al., 2025).

With ``Ā = avg(A)`` and ``B̄ = avg(B)``, the server solves
``B' = argmin ||B' Ā - ΔW_ideal||² + λ ||B' - B̄||²`` with ``ΔW_ideal = Σ w_k B_k A_k``:
``B' = (ΔW_ideal Āᵀ + λ B̄)(Ā Āᵀ + λ I)⁻¹``. The regularizer keeps B' near the average so
clients resume from a familiar point; λ is relative to ``trace(Ā Āᵀ) / r``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from federated.strategies.base import Pairs, ideal_delta, weighted_mean

DEFAULT_REG = 1e-2


def corrected_b(ideal: np.ndarray, A_bar: np.ndarray, B_bar: np.ndarray, reg: float) -> np.ndarray:
    """The regularized least-squares ``B'`` for one module (float64)."""
    A = A_bar.astype(np.float64)
    gram = A @ A.T
    rank = gram.shape[0]
    lam = reg * max(np.trace(gram) / rank, 1e-12)
    rhs = ideal @ A.T + lam * B_bar.astype(np.float64)
    # Solve X (G + λI) = rhs via the symmetric system (G + λI) Xᵀ = rhsᵀ.
    return np.linalg.solve(gram + lam * np.eye(rank), rhs.T).T


def lora_fair(
    updates: Sequence[Pairs], weights: Sequence[float], reg: float = DEFAULT_REG
) -> Pairs:
    """Per module, ``(Ā, B')``."""
    out: Pairs = {}
    for name in updates[0]:
        A_bar = weighted_mean([u[name][0] for u in updates], weights)
        B_bar = weighted_mean([u[name][1] for u in updates], weights)
        ideal = ideal_delta(updates, weights, name)
        out[name] = (A_bar, corrected_b(ideal, A_bar, B_bar, reg).astype(B_bar.dtype))
    return out
