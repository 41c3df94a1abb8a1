"""MoS math: the shared shard pools and the layer that gathers its LoRA factors from them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterhub.methods.layer_base import AdapterLayer
from adapterhub.methods.lowrank import LowRankDelta


class MoSPool(nn.Module):
    """The trainable pools of one projection type: ``A [n, d_in/l]`` and ``B [n, d_out/l]``."""

    def __init__(
        self, rows: int, in_features: int, out_features: int, shards_per_vector: int,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        width_A, width_B = in_features // shards_per_vector, out_features // shards_per_vector
        self.A = nn.Parameter(torch.empty(rows, width_A, device=device))
        self.B = nn.Parameter(torch.zeros(rows, width_B, device=device))
        # PEFT draws A from kaiming_uniform(a=sqrt(5)), i.e. U(±1/sqrt(d_in)). Applying kaiming
        # to the pool would use the shard width as fan-in, so set the bound from the full d_in
        # to give assembled rows LoRA's scale.
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.A, -bound, bound)


class MoSLinear(AdapterLayer):
    """A base Linear plus ``scaling * B A dropout(x)`` with A, B gathered from a shared pool."""

    def __init__(
        self, base_layer: nn.Linear, pool: MoSPool, index_A: Tensor, index_B: Tensor,
        rank: int, scaling: float, dropout: float,
    ) -> None:
        super().__init__(base_layer, scaling, dropout)
        # The pool is shared by all layers of a projection type and registered once on the
        # adapter model; registering it here too would repeat it in every state dict.
        self.__dict__["pool"] = pool
        self.rank = rank
        self.register_buffer("index_A", index_A.to(self.device))
        self.register_buffer("index_B", index_B.to(self.device))

    def factors(self) -> tuple[Tensor, Tensor]:
        """This layer's ``A [r, d_in]`` and ``B [d_out, r]`` (unscaled, differentiable)."""
        A = self.pool.A.index_select(0, self.index_A).reshape(self.rank, self.in_features)
        B = self.pool.B.index_select(0, self.index_B).reshape(self.rank, self.out_features)
        return A, B.t()

    def delta(self, x: Tensor, base_out: Tensor) -> Tensor:
        A, B = self.factors()
        # Same op order as PEFT's lora_B(lora_A(dropout(x))) * scaling, so p = e = r matches it.
        return F.linear(F.linear(self.dropout(x.to(A.dtype)), A), B) * self.scaling

    def adapter_tensors(self) -> dict[str, Tensor]:
        return {"index_A": self.index_A, "index_B": self.index_B}

    @torch.no_grad()
    def lowrank(self) -> LowRankDelta:
        A, B = self.factors()
        return LowRankDelta(A=A, B=B * self.scaling)
