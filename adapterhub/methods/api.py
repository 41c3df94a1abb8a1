"""Entry points: create an adapter on a base model, load one from disk, read its config."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel

from adapterhub.errors import AdapterError, IncompatibleAdapterError
from adapterhub.methods.base import AdapterModel
from adapterhub.methods.configs import AdapterConfig, config_from_dict
from adapterhub.methods.files import read_config_json, read_tensors
from adapterhub.methods.hydra.config import HydraConfig
from adapterhub.methods.hydra.model import HydraAdapterModel
from adapterhub.methods.lora.config import LoraConfig
from adapterhub.methods.lora.model import LoraAdapterModel
from adapterhub.methods.lora.peft_config import from_peft_dict
from adapterhub.methods.mos.config import MoSConfig
from adapterhub.methods.mos.model import MoSAdapterModel
from adapterhub.methods.quant import prepare_4bit_layers
from adapterhub.methods.targets import ensure_no_adapter

_MODEL_CLASSES: dict[type, type[AdapterModel]] = {
    LoraConfig: LoraAdapterModel,
    MoSConfig: MoSAdapterModel,
    HydraConfig: HydraAdapterModel,
}


def create_adapter(model: PreTrainedModel, config: AdapterConfig) -> AdapterModel:
    """Inject a freshly initialized adapter into ``model`` (in place) and freeze the base."""
    cls = _MODEL_CLASSES.get(type(config))
    if cls is None:
        raise TypeError(f"expected LoraConfig, MoSConfig or HydraConfig, got {type(config)}")
    ensure_no_adapter(model)
    prepare_4bit_layers(model)
    return cls(model, config)


def read_adapter_config(path: str | Path) -> AdapterConfig:
    """The config of a native adapter dir, or of a plain PEFT LoRA dir (as a LoraConfig)."""
    data = read_config_json(Path(path))
    if "adapterhub_method" not in data:
        return from_peft_dict(data)
    try:
        return config_from_dict(data)
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"invalid adapter_config.json in {path}: {exc}") from None


def load_adapter(model: PreTrainedModel, path: str | Path) -> AdapterModel:
    """Inject the adapter saved at ``path`` into ``model``; on failure ``model`` is left as is."""
    path = Path(path)
    config = read_adapter_config(path)
    tensors = read_tensors(path)
    try:
        adapter = create_adapter(model, config)
    except ValueError as exc:
        raise IncompatibleAdapterError(f"adapter at {path} does not fit the model: {exc}") from None
    try:
        adapter.load_adapter_state_dict(tensors)
    except AdapterError:
        adapter.unload()
        raise
    return adapter
