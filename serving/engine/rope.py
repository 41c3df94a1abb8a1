"""Rotary position embeddings, numerically the same as transformers' for every ``rope_type``.

The inverse frequencies and the attention scaling come from transformers' own
``ROPE_INIT_FUNCTIONS``, so every scaling kind HF supports (linear, dynamic, yarn, longrope,
llama3, ...) is computed by HF's code, not re-derived here.

Position-dependent kinds (``dynamic`` NTK and ``longrope``) are resolved per token with
``seq_len = position + 1``: each token gets the frequencies HF's incremental generation gives it,
and the result never depends on how tokens were batched or chunked. (HF's one-shot forward of a
long prompt instead uses the longest position in the batch for every token, so the two differ
only past ``original_max_position_embeddings``, as HF's own forward and generate do.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from serving.engine import kernels


def _default_inv_freq(base: float, dim: int) -> Tensor:
    # Same expression as LlamaRotaryEmbedding.compute_default_rope_parameters (not in the table).
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


class RotaryEmbedding(nn.Module):
    """cos/sin tables for a flat batch of token positions."""

    def __init__(self, config: PretrainedConfig, head_dim: int, device: torch.device | str):
        super().__init__()
        params = config.rope_parameters
        if not params or "rope_type" not in params:
            raise ValueError(f"unsupported rope_parameters (per-layer RoPE?): {params!r}")
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not a Llama-family feature")
        self.config = config
        self.rope_type = params["rope_type"]
        # HF computes the frequencies on the CPU at init and moves them; do the same so the
        # values are bit-identical whatever the target device.
        if self.rope_type == "default":
            inv_freq, scaling = _default_inv_freq(params["rope_theta"], head_dim), 1.0
        elif self.rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[self.rope_type](config)
        else:
            raise ValueError(f"unknown rope_type {self.rope_type!r}")
        if inv_freq.shape[-1] * 2 != head_dim:
            raise ValueError(f"RoPE covers {inv_freq.shape[-1] * 2} dims, head_dim is {head_dim}")
        self.attention_scaling = float(scaling)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        if self.rope_type == "longrope":
            self.original_max = params["original_max_position_embeddings"]
            long_inv_freq, _ = ROPE_INIT_FUNCTIONS["longrope"](
                config, seq_len=self.original_max + 1
            )
            self.register_buffer("long_inv_freq", long_inv_freq.to(device), persistent=False)

    def _inv_freq(self, positions: Tensor) -> Tensor:
        if self.rope_type == "dynamic":
            # HF's dynamic NTK init function accepts a tensor seq_len: one row per token.
            inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](
                self.config, positions.device, seq_len=positions[:, None] + 1
            )
            return inv_freq
        if self.rope_type == "longrope":
            use_long = (positions[:, None] + 1) > self.original_max
            return torch.where(use_long, self.long_inv_freq, self.inv_freq)
        return self.inv_freq

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin, each [T, head_dim] in ``dtype``, for positions [T]."""
        freqs = positions[:, None].float() * self._inv_freq(positions).float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return (
            (emb.cos() * self.attention_scaling).to(dtype),
            (emb.sin() * self.attention_scaling).to(dtype),
        )


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [T, heads, head_dim] by the per-token cos/sin [T, head_dim] (HF's half layout).
    On the CPU in float32 or bfloat16, one native pass (kernels/pointwise.c) instead of six
    torch ops."""
    lib = kernels.pointwise_lib_for(x, cos, sin) if x.dim() == 3 else None
    if lib is not None:
        return kernels.rope(lib, x, cos, sin)
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin
