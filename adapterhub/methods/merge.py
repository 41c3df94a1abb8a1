"""Writing low-rank deltas into a plain model's Linear weights."""

from __future__ import annotations

import torch
from torch import nn

from adapterhub.errors import AdapterError
from adapterhub.methods.lowrank import LowRankDelta
from adapterhub.methods.quant import dequantize_weight, is_4bit
from adapterhub.methods.targets import replace_module


def _dense_copy(layer: nn.Linear, with_bias: bool) -> nn.Linear:
    """A plain Linear with the (dequantized) weight and bias of ``layer``."""
    weight = dequantize_weight(layer)
    dense = nn.Linear(
        layer.in_features, layer.out_features, bias=with_bias,
        device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        dense.weight.copy_(weight)
        if with_bias:
            dense.bias.zero_()
            if layer.bias is not None:
                dense.bias.copy_(layer.bias)
    dense.requires_grad_(False)
    return dense


@torch.no_grad()
def merge_deltas(model: nn.Module, deltas: dict[str, LowRankDelta]) -> nn.Module:
    """Add each delta to the Linear at its path; returns ``model`` (modified in place).

    A layer without bias that receives one (LoRA's lora_bias on a bias-free layer) gets a bias
    parameter; note that a config without biases will not reload it from ``save_pretrained``.
    """
    for name, delta in deltas.items():
        layer = model.get_submodule(name)
        needs_bias = delta.bias is not None and layer.bias is None
        if is_4bit(layer) or needs_bias:
            layer = _dense_copy(layer, with_bias=layer.bias is not None or needs_bias)
            replace_module(model, name, layer)
        weight = layer.weight
        update = delta.weight().to(device=weight.device, dtype=torch.float32)
        new_weight = weight.float() + update
        if not torch.isfinite(new_weight).all():
            raise AdapterError(f"merging produced non-finite weights in {name}")
        weight.copy_(new_weight.to(weight.dtype))
        if delta.bias is not None:
            layer.bias.add_(delta.bias.to(device=layer.bias.device, dtype=layer.bias.dtype))
    return model
