"""AdapterModel: the thin interface every method implements, and the behaviour they share."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from adapterhub.errors import AdapterError, IncompatibleAdapterError
from adapterhub.methods.configs import AdapterConfig
from adapterhub.methods.files import write_adapter_dir
from adapterhub.methods.lowrank import LowRankDelta
from adapterhub.methods.merge import merge_deltas
from adapterhub.methods.peft_export import write_peft_lora

_LISTED = 5  # names quoted in an error before "and N more"


def _quote(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


class AdapterModel(nn.Module, abc.ABC):
    """A base causal LM with one adapter injected; subclasses supply the method specifics.

    Subclasses implement ``_adapter_tensors`` (live tensors by native key), ``lowrank`` and
    ``unload``; saving, loading, merging and PEFT export are shared and built on those three.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, base_name: str) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.base_model_name_or_path = base_name

    # --- the causal LM ---------------------------------------------------------------------
    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    def generate(self, **kwargs: Any) -> Any:
        return self.model.generate(**kwargs)

    # --- method hooks ----------------------------------------------------------------------
    @abc.abstractmethod
    def _adapter_tensors(self) -> dict[str, Tensor]:
        """Live adapter tensors by native key; loading writes into exactly these."""

    def _check_loaded(self, sd: dict[str, Tensor]) -> None:
        """Method-specific value checks on a shape-checked state dict (default: none)."""

    @abc.abstractmethod
    def lowrank(self) -> dict[str, LowRankDelta]:
        """Per adapted module path (e.g. ``model.layers.0.self_attn.q_proj``), its delta."""

    @abc.abstractmethod
    def unload(self) -> PreTrainedModel:
        """The base model with the adapter layers removed, not merged. Ends this adapter."""

    # --- parameters and state --------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def adapter_state_dict(self) -> dict[str, Tensor]:
        return {k: t.detach().clone() for k, t in self._adapter_tensors().items()}

    def load_adapter_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Copy ``sd`` in after checking it names exactly our tensors with the same shapes."""
        live = self._adapter_tensors()
        missing = sorted(set(live) - set(sd))
        unexpected = sorted(set(sd) - set(live))
        if unexpected:
            modules = sorted({self._module_of(key) for key in unexpected})
            raise IncompatibleAdapterError(
                f"adapter has weights for {len(modules)} module(s) that {self._arch()} lacks "
                f"or this {self.config.method} config does not target: {_quote(modules)}"
            )
        if missing:
            raise IncompatibleAdapterError(f"adapter lacks tensors: {_quote(missing)}")
        for key, tensor in live.items():
            if tuple(sd[key].shape) != tuple(tensor.shape):
                raise IncompatibleAdapterError(
                    f"shape mismatch for {key}: adapter has {list(sd[key].shape)}, "
                    f"{self._arch()} needs {list(tensor.shape)}"
                )
            if sd[key].is_floating_point() != tensor.is_floating_point():
                raise AdapterError(f"{key} has dtype {sd[key].dtype}, expected {tensor.dtype}")
        self._check_loaded(sd)
        with torch.no_grad():
            for key, tensor in live.items():
                tensor.copy_(sd[key])

    def _module_of(self, key: str) -> str:
        """The module path a native tensor key belongs to (for error messages)."""
        return key.rpartition(".")[0]

    def _arch(self) -> str:
        return type(self._hf_model()).__name__

    def _hf_model(self) -> nn.Module:
        """The HF model object inside (for LoRA, inside the PeftModel)."""
        return self.model

    # --- conversions -----------------------------------------------------------------------
    def merge_and_unload(self) -> PreTrainedModel:
        """The base model with ``W0 + BA`` (and ``b0 + bias``) written into its layers.

        4-bit base layers become dense Linear layers in their dequantized dtype: requantizing
        would throw away most of the update. Ends this adapter, like ``unload``.
        """
        deltas = self.lowrank()
        return merge_deltas(self.unload(), deltas)

    def save(self, path: str | Path) -> None:
        """Native dir: adapter_config.json + adapter_model.safetensors (see ``load_adapter``)."""
        meta = {
            **self.config.to_dict(),
            "adapterhub_method": self.config.method,
            "base_model_name_or_path": self.base_model_name_or_path,
        }
        write_adapter_dir(Path(path), meta, self.adapter_state_dict())

    def export_peft_lora(self, path: str | Path) -> None:
        """A plain PEFT LoRA dir with the same function (scaling folded into B, alpha == r)."""
        write_peft_lora(
            Path(path), self.lowrank(), self.config.target_modules,
            self.base_model_name_or_path, self.config.dropout,
        )
