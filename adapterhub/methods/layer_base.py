"""Common shell of the MoS and Hydra layers: wrap a base Linear, add a low-rank branch."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import Tensor, nn

from adapterhub.methods.lowrank import LowRankDelta


class AdapterLayer(nn.Module, abc.ABC):
    """``forward(x) = base_layer(x) + delta(x, base_output)``; subclasses define ``delta``.

    Adapter parameters are fp32 on the base weight's device (PEFT's default too): a 4-bit base
    has no float weight dtype to follow, and half-precision adapters train poorly.
    """

    def __init__(self, base_layer: nn.Linear, scaling: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> Tensor:
        # Model code sometimes reads `proj.weight` (dtype/device probes); answer for the base.
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def device(self) -> torch.device:
        return self.base_layer.weight.device

    @abc.abstractmethod
    def delta(self, x: Tensor, base_out: Tensor) -> Tensor:
        """The adapter's additive term (already scaled), in adapter dtype."""

    @abc.abstractmethod
    def adapter_tensors(self) -> dict[str, Tensor]:
        """Live adapter tensors of this layer by local name (parameters and index buffers)."""

    @abc.abstractmethod
    def lowrank(self) -> LowRankDelta:
        """This layer's update as one LoRA-shaped delta (detached)."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        return result + self.delta(x, result).to(result.dtype)
