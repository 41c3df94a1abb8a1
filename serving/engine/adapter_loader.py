"""Turn an adapter directory (LoRA, MoS or Hydra; safetensors only) into a HostAdapter.

The adapter methods' own code does the conversion (one implementation of each method's
math): it needs a transformers model to attach to, so we build one on the meta device and
point its parameters at the engine's weights, which costs no extra weight memory.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from adapterhub.errors import AdapterError
from serving.engine.adapter_store import HostAdapter, build_host_adapter

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$")


def hf_skeleton(model: torch.nn.Module) -> PreTrainedModel:
    """A transformers model whose parameters are the serving model's tensors (shared)."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    skeleton.load_state_dict(model.state_dict(), strict=False, assign=True)
    if getattr(model, "tie_word_embeddings", False):
        skeleton.tie_weights()
    for p in skeleton.parameters():
        p.requires_grad_(False)
    return skeleton


def module_key(name: str) -> tuple[int, str]:
    """``model.layers.3.self_attn.q_proj`` -> (3, "q_proj")."""
    m = _KEY.search(name)
    if m is None:
        raise AdapterError(f"adapter targets {name!r}, which is not a decoder-layer projection")
    return int(m.group(1)), m.group(2)


def load_host_adapter(
    name: str, path: str | Path, model: torch.nn.Module, dtype: torch.dtype = torch.float32
) -> HostAdapter:
    """Validate and normalize the adapter at ``path`` against the serving model."""
    from adapterhub.methods import load_adapter

    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter directory not found: {path}")
    adapter = load_adapter(hf_skeleton(model), path)
    return host_adapter_from_model(name, adapter, model.shape, dtype, str(path))


def host_adapter_from_model(name: str, adapter, shape, dtype: torch.dtype = torch.float32,
                            source: str = "") -> HostAdapter:
    """The normalized low-rank form of a live AdapterModel (e.g. one being trained)."""
    weights = {
        module_key(key): (d.A.detach().cpu(), d.B.detach().cpu(),
                          None if d.bias is None else d.bias.detach().cpu())
        for key, d in adapter.lowrank().items()
    }
    return build_host_adapter(name, weights, shape, dtype, adapter.config.method, source)
