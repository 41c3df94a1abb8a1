"""Hydra math: ``delta = s * (B_p A_p x + B_s A_s h)`` with ``h`` the base layer's output."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterhub.methods.layer_base import AdapterLayer
from adapterhub.methods.lowrank import LowRankDelta
from adapterhub.methods.quant import dequantize_weight


def _lora_pair(rank: int, d_in: int, d_out: int, device: torch.device) -> tuple[nn.Parameter, ...]:
    """``A [rank, d_in]`` with PEFT LoRA's kaiming init and ``B [d_out, rank]`` zeros."""
    A = nn.Parameter(torch.empty(rank, d_in, device=device))
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    return A, nn.Parameter(torch.zeros(d_out, rank, device=device))


class HydraLinear(AdapterLayer):
    """A base Linear plus a parallel (on x) and a sequential (on W0 x + b0) low-rank branch.

    A branch of rank 0 has no parameters at all. Dropout applies to each branch's input.
    """

    def __init__(
        self, base_layer: nn.Linear, r_parallel: int, r_sequential: int, scaling: float,
        dropout: float,
    ) -> None:
        super().__init__(base_layer, scaling, dropout)
        self.r_parallel = r_parallel
        self.r_sequential = r_sequential
        d_in, d_out = self.in_features, self.out_features
        if r_parallel:
            self.parallel_A, self.parallel_B = _lora_pair(r_parallel, d_in, d_out, self.device)
        if r_sequential:
            # The sequential branch reads the base output, so its A is [r_s, d_out].
            pair = _lora_pair(r_sequential, d_out, d_out, self.device)
            self.sequential_A, self.sequential_B = pair

    def delta(self, x: Tensor, base_out: Tensor) -> Tensor:
        out = None
        if self.r_parallel:
            h = self.dropout(x.to(self.parallel_A.dtype))
            out = F.linear(F.linear(h, self.parallel_A), self.parallel_B)
        if self.r_sequential:
            h = self.dropout(base_out.to(self.sequential_A.dtype))
            seq = F.linear(F.linear(h, self.sequential_A), self.sequential_B)
            out = seq if out is None else out + seq
        return out * self.scaling

    def adapter_tensors(self) -> dict[str, Tensor]:
        names = []
        if self.r_parallel:
            names += ["parallel_A", "parallel_B"]
        if self.r_sequential:
            names += ["sequential_A", "sequential_B"]
        return {n: getattr(self, n) for n in names}

    @torch.no_grad()
    def lowrank(self) -> LowRankDelta:
        """``A' = [A_p; A_s W0]``, ``B' = s [B_p, B_s]``, ``bias = s B_s A_s b0``."""
        As, Bs, bias = [], [], None
        if self.r_parallel:
            As.append(self.parallel_A)
            Bs.append(self.parallel_B)
        if self.r_sequential:
            A_s = self.sequential_A
            w0 = dequantize_weight(self.base_layer).to(A_s.dtype)
            As.append(A_s @ w0)
            Bs.append(self.sequential_B)
            b0 = self.base_layer.bias
            if b0 is not None:
                bias = self.sequential_B @ (A_s @ b0.to(A_s.dtype)) * self.scaling
        A = torch.cat(As, dim=0)
        B = torch.cat(Bs, dim=1) * self.scaling
        return LowRankDelta(A=A, B=B, bias=bias)
