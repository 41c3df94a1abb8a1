"""The normalized form every method reduces to: one low-rank delta per adapted Linear."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class LowRankDelta:
    """``W' = W0 + B @ A`` and ``b' = b0 + bias``; the method's scaling is already folded into B.

    Shapes: ``A [r, d_in]``, ``B [d_out, r]``, ``bias [d_out]`` or None when the method adds none.
    """

    A: Tensor
    B: Tensor
    bias: Tensor | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def weight(self) -> Tensor:
        """The dense ``[d_out, d_in]`` update."""
        return self.B @ self.A
