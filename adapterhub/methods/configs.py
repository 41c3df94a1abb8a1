"""The method registry: the config union, ``make_config`` and ``config_from_dict``."""

from __future__ import annotations

from typing import Any

from adapterhub.methods.hydra.config import HydraConfig
from adapterhub.methods.lora.config import LoraConfig
from adapterhub.methods.mos.config import MoSConfig

AdapterConfig = LoraConfig | MoSConfig | HydraConfig
METHODS: tuple[str, ...] = ("lora", "mos", "hydra")

_CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    cls.method: cls for cls in (LoraConfig, MoSConfig, HydraConfig)
}
# Keys that adapter_config.json carries next to the config fields.
FILE_KEYS = ("adapterhub_method", "base_model_name_or_path")


def config_class(method: str) -> type[AdapterConfig]:
    """The config dataclass for ``method``; ValueError naming the valid methods otherwise."""
    try:
        return _CONFIG_CLASSES[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown adapter method {method!r}; valid methods: {', '.join(METHODS)}"
        ) from None


def make_config(method: str, **hparams: Any) -> AdapterConfig:
    """Build and validate the config of ``method``; unknown hyperparameters are a ValueError."""
    return config_class(method).from_dict(hparams)


def config_from_dict(d: dict[str, Any]) -> AdapterConfig:
    """Inverse of ``config.to_dict()``; also accepts a whole native adapter_config.json dict."""
    d = dict(d)
    method = d.pop("method", None) or d.get("adapterhub_method")
    for key in FILE_KEYS:
        d.pop(key, None)
    return config_class(method).from_dict(d)
