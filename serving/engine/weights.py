"""Read a local HF checkpoint directory: config.json and *.safetensors (never pickles).

Tensors are matched to the model's parameters by their HF names, checked for shape before they
are read, and copied in place (casting to the model's dtype and device on the way).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def read_config(path: str | Path) -> dict:
    """The checkpoint's config.json as a dict."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"no config.json in {path}")
    return json.loads(file.read_text())


def safetensors_files(path: str | Path) -> list[Path]:
    """The shards to read: those the index names, else every *.safetensors in the directory."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        # Some repos also ship differently named consolidated files; the index is authoritative.
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {path}")
    return files


@torch.no_grad()
def load_weights(model: nn.Module, path: str | Path) -> None:
    """Fill every parameter of ``model`` from the checkpoint at ``path``.

    Raises ValueError naming any parameter the checkpoint lacks or holds with another shape.
    Checkpoint tensors the model has no parameter for (e.g. a tied ``lm_head.weight`` or old
    rotary ``inv_freq`` buffers) are ignored.
    """
    # named_parameters() drops duplicates, so a tied lm_head is filled through the embedding.
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                param = params.get(name)
                if param is None:
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(param.shape):
                    raise ValueError(
                        f"{file.name}: tensor {name!r} has shape {shape}, "
                        f"expected {tuple(param.shape)}"
                    )
                param.copy_(f.get_tensor(name))
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"checkpoint {path} is missing {len(missing)} tensor(s): {shown}")
