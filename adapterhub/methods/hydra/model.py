"""Hydra injection: one HydraLinear per targeted layer."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from adapterhub.methods.base import AdapterModel
from adapterhub.methods.config_base import lora_scaling
from adapterhub.methods.hydra.config import HydraConfig
from adapterhub.methods.hydra.layer import HydraLinear
from adapterhub.methods.lowrank import LowRankDelta
from adapterhub.methods.targets import replace_module, resolve_targets, unwrap_adapter_layers


class HydraAdapterModel(AdapterModel):
    """A causal LM whose targeted Linears carry Hydra's parallel and sequential branches."""

    config: HydraConfig

    def __init__(self, model: PreTrainedModel, config: HydraConfig) -> None:
        super().__init__(model, config, getattr(model, "name_or_path", "") or "")
        targets = resolve_targets(model, config.target_modules)
        model.requires_grad_(False)
        scaling = lora_scaling(config.alpha, config.rank, config.use_rslora)
        for name, layer in targets:
            replace_module(model, name, HydraLinear(
                layer, config.r_parallel, config.r_sequential, scaling, config.dropout,
            ))

    def _layers(self) -> dict[str, HydraLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, HydraLinear)}

    def _adapter_tensors(self) -> dict[str, Tensor]:
        return {
            f"{name}.{k}": t
            for name, layer in self._layers().items()
            for k, t in layer.adapter_tensors().items()
        }

    @torch.no_grad()
    def lowrank(self) -> dict[str, LowRankDelta]:
        return {name: layer.lowrank() for name, layer in self._layers().items()}

    def unload(self) -> PreTrainedModel:
        return unwrap_adapter_layers(self.model)
