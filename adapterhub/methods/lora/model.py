"""LoRA as a thin wrapper over a ``peft.PeftModel``; PEFT owns the layers and their math."""

from __future__ import annotations

import re

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn
from transformers import PreTrainedModel

from adapterhub.methods.base import AdapterModel
from adapterhub.methods.lora.config import LoraConfig
from adapterhub.methods.lora.peft_config import to_peft_config
from adapterhub.methods.lowrank import LowRankDelta
from adapterhub.methods.peft_export import PEFT_PREFIX
from adapterhub.methods.targets import resolve_targets

ADAPTER = "default"
# PEFT parameter names carry the adapter name; its files do not (…lora_A.default.weight ->
# …lora_A.weight). Our native keys are PEFT's file keys, so PEFT dirs load as native LoRA.
_NAME_IN_PARAM = re.compile(rf"\.(lora_[AB])\.{ADAPTER}\.")


class LoraAdapterModel(AdapterModel):
    """``model`` is the ``PeftModel``; the HF model sits inside it."""

    config: LoraConfig
    model: PeftModel

    def __init__(self, model: PreTrainedModel, config: LoraConfig) -> None:
        # PEFT only fails when nothing matches; check each target for a precise error.
        resolve_targets(model, config.target_modules)
        base_name = getattr(model, "name_or_path", "") or ""
        super().__init__(get_peft_model(model, to_peft_config(config), ADAPTER), config, base_name)

    def _hf_model(self) -> nn.Module:
        return self.model.get_base_model()

    def _module_of(self, key: str) -> str:
        return key.removeprefix(PEFT_PREFIX).rpartition(".lora_")[0] or key

    def _layers(self) -> dict[str, LoraLayer]:
        return {
            name.removeprefix(PEFT_PREFIX): m
            for name, m in self.model.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
        }

    def _adapter_tensors(self) -> dict[str, Tensor]:
        return {
            _NAME_IN_PARAM.sub(r".\1.", name): p
            for name, p in self.model.named_parameters()
            if _NAME_IN_PARAM.search(name)
        }

    @torch.no_grad()
    def lowrank(self) -> dict[str, LowRankDelta]:
        out = {}
        for name, layer in self._layers().items():
            scaling = layer.scaling[ADAPTER]
            lora_B = layer.lora_B[ADAPTER]
            bias = lora_B.bias * scaling if layer.lora_bias[ADAPTER] else None
            out[name] = LowRankDelta(
                A=layer.lora_A[ADAPTER].weight.clone(), B=lora_B.weight * scaling, bias=bias,
            )
        return out

    def unload(self) -> PreTrainedModel:
        return self.model.unload()
