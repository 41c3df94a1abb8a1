"""Adapter directories on disk: JSON config plus safetensors, read defensively.

Only safetensors is ever read: a pickle file (adapter_model.bin) can execute code on load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from adapterhub.errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"


def write_adapter_dir(path: Path, config: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Write ``config`` as adapter_config.json and ``tensors`` as adapter_model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = {k: t.detach().contiguous().cpu() for k, t in tensors.items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})


def read_config_json(path: Path) -> dict[str, Any]:
    """The parsed adapter_config.json of the adapter dir ``path``."""
    if not path.is_dir():
        raise AdapterError(f"adapter directory {path} does not exist")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(f"{path} has no {CONFIG_NAME}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{file} must hold a JSON object")
    return data


def read_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of adapter_model.safetensors in ``path``, all finite."""
    file = path / WEIGHTS_NAME
    if not file.is_file():
        if (path / PICKLE_NAME).is_file():
            raise AdapterError(
                f"{path} holds only {PICKLE_NAME} (pickle, unsafe to load); "
                f"convert it to {WEIGHTS_NAME}"
            )
        raise AdapterError(f"{path} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(str(file))
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
        raise AdapterError(f"{file} is not a readable safetensors file: {exc}") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterError(f"{file}: tensor {key} contains NaN or infinite values")
    return tensors
