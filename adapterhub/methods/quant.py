"""bitsandbytes 4-bit (NF4/FP4) base layers: detection, exact dequantization, training safety.

On CPUs with AVX512-BF16, ``bnb.nn.Linear4bit`` repacks its weight in place into a CPU-only
layout the first time it runs in eval mode without grad, and from then on computes in bf16
through a kernel without a backward. After that, ``dequantize_4bit(weight.data, quant_state)``
silently returns wrong values and training through the layer fails. We read that layout
ourselves, and before adapting a model we restore the standard layout and switch the fast path
off, so adapter training, merging and export all see the fp32 W0 the config asked for.
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from torch import Tensor, nn

# bitsandbytes packs the CPU layout in blocks of this many output rows (its default block_n).
_CPU_BLOCK_N = 32


def is_4bit(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit Linear base layer."""
    return isinstance(module, bnb.nn.Linear4bit)


def _is_cpu_packed(quant_state: object) -> bool:
    return bool(getattr(quant_state, "packing_format_for_cpu", False))


def _dequantize_cpu_packed(packed: Tensor, quant_state: bnbf.QuantState) -> Tensor:
    """Dense ``[N, K]`` weight from bitsandbytes' AVX512 layout (absmax is bf16, ``[K/bs, N]``)."""
    n, k_half = packed.shape
    k = 2 * k_half
    rows = packed.reshape(-1, _CPU_BLOCK_N)
    nibbles = torch.cat([rows & 0xF, rows >> 4], dim=-1)
    codes = nibbles.reshape(n // _CPU_BLOCK_N, k_half, _CPU_BLOCK_N, 2).transpose(1, 2)
    codes = codes.reshape(n, k).long()
    values = quant_state.code.float()[codes]
    absmax = quant_state.absmax.float().t().unsqueeze(-1)  # [N, K/bs, 1]
    blocks = values.reshape(n, k // quant_state.blocksize, quant_state.blocksize) * absmax
    return blocks.reshape(n, k)


def dequantize_weight(layer: nn.Linear) -> Tensor:
    """``W0`` of a base Linear as a dense float ``[d_out, d_in]`` tensor (detached view or copy)."""
    if not is_4bit(layer):
        return layer.weight.detach()
    weight = layer.weight
    if _is_cpu_packed(weight.quant_state):
        return _dequantize_cpu_packed(weight.data, weight.quant_state)
    return bnbf.dequantize_4bit(weight.data, weight.quant_state)


def prepare_4bit_layers(model: nn.Module) -> None:
    """Make every 4-bit Linear of ``model`` trainable-through and exactly dequantizable."""
    for module in model.modules():
        if not is_4bit(module):
            continue
        weight = module.weight
        state = weight.quant_state
        if _is_cpu_packed(state):
            # Requantizing the dequantized weight reproduces the codes exactly: each block's
            # absmax element maps to the code ±1, so absmax and every code come back unchanged.
            dense = _dequantize_cpu_packed(weight.data, state)
            data, new_state = bnbf.quantize_4bit(
                dense, blocksize=state.blocksize, quant_type=state.quant_type,
                compress_statistics=False, quant_storage=weight.quant_storage,
            )
            new_state.dtype = getattr(state, "original_dtype", state.dtype)
            weight.data = data
            weight.quant_state = new_state
            module.quant_state = new_state
        module.support_avx512bf16_for_cpu = False
