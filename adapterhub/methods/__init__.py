"""Adapter methods (LoRA, MoS, Hydra): configs, injection, and conversion to plain LoRA.

Each method lives in its own package (config / layer math / model injection, like PEFT's
tuners); everything reduces to per-module ``LowRankDelta``s for merging, export and serving.
"""

from adapterhub.methods.api import create_adapter, load_adapter, read_adapter_config
from adapterhub.methods.base import AdapterModel
from adapterhub.methods.configs import METHODS, AdapterConfig, config_from_dict, make_config
from adapterhub.methods.hydra.config import HydraConfig
from adapterhub.methods.lora.config import LoraConfig
from adapterhub.methods.lowrank import LowRankDelta
from adapterhub.methods.mos.config import MoSConfig

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterModel",
    "HydraConfig",
    "LoraConfig",
    "LowRankDelta",
    "MoSConfig",
    "config_from_dict",
    "create_adapter",
    "load_adapter",
    "make_config",
    "read_adapter_config",
]
