"""Llama-family decoder for serving (Llama 2/3, Mistral, Qwen2) over a flat batch of tokens.

Module and parameter names mirror transformers' so checkpoints load by name. Every adapter
target projection is an :class:`AdapterLinear`, the single place where a multi-adapter LoRA
operator adds its delta. Projections stay separate (no fused QKV / gate-up) so that operator sees
each module's own input and output; fusing them is a later optimisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from serving.engine import kernels
from serving.engine.attention import AttentionMetadata, paged_attention
from serving.engine.layout import ModelShape
from serving.engine.packed_linear import PackedWeight, pack_weight
from serving.engine.rope import RotaryEmbedding, apply_rope
from serving.engine.weights import load_weights, read_config

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class LoraHook(Protocol):
    """The LoRA operator as the model sees it, around each target module's base projection."""

    def begin(self, layer: int, module: str, x: Tensor) -> None:
        """Before the base projection (a hook may start the deltas' work here)."""

    def apply(self, layer: int, module: str, x: Tensor, y: Tensor) -> Tensor:
        """After it: y plus the deltas of x's tokens."""


def _empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    # Uninitialised: weights come from the checkpoint, and random init of a 7B model is slow.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class AdapterLinear(nn.Module):
    """A base projection whose output the LoRA operator may add to."""

    def __init__(self, layer: int, name: str, d_in: int, d_out: int, bias: bool, dtype, device):
        super().__init__()
        self.layer, self.name = layer, name
        self.weight = _empty(d_out, d_in, dtype=dtype, device=device)
        self.bias = _empty(d_out, dtype=dtype, device=device) if bias else None
        # Not a parameter or buffer: a cache of ``weight`` that state dicts, .to() and the
        # co-serving skeleton never see (LlamaForServing.pack_weights).
        self.packed: PackedWeight | None = None

    def forward(self, x: Tensor, lora: LoraHook | None) -> Tensor:
        if lora is not None:
            lora.begin(self.layer, self.name, x)
        if self.packed is not None and self.packed.usable(x):
            y = self.packed.linear(x, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if lora is not None:
            y = lora.apply(self.layer, self.name, x, y)
        return y


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        lib = kernels.pointwise_lib_for(x, self.weight) if x.dim() == 2 else None
        if lib is not None:
            return kernels.rmsnorm(lib, x, self.weight, self.eps)
        # HF's order of casts, so bf16 results match it bit for bit.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: PretrainedConfig, shape: ModelShape, layer: int, dtype, device):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = shape.num_heads, shape.num_kv_heads
        self.head_dim = shape.head_dim
        self.scale = shape.head_dim**-0.5
        qkv_bias, o_bias = _attention_biases(cfg)
        dims = shape.module_dims()
        for name, bias in (("q_proj", qkv_bias), ("k_proj", qkv_bias), ("v_proj", qkv_bias),
                           ("o_proj", o_bias)):
            setattr(self, name, AdapterLinear(layer, name, *dims[name], bias, dtype, device))
        self.window = _sliding_window(cfg, layer)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata,
                kv: Tensor, lora: LoraHook | None) -> Tensor:
        t = x.shape[0]
        q = self.q_proj(x, lora).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x, lora).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, lora).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = paged_attention(q, k, v, kv[:, self.layer], meta, self.scale, self.window)
        return self.o_proj(o.reshape(t, -1), lora)


class MLP(nn.Module):
    def __init__(self, cfg: PretrainedConfig, shape: ModelShape, layer: int, dtype, device):
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        dims = shape.module_dims()
        for name in ("gate_proj", "up_proj", "down_proj"):
            setattr(self, name, AdapterLinear(layer, name, *dims[name], bias, dtype, device))
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x: Tensor, lora: LoraHook | None) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x, lora)) * self.up_proj(x, lora), lora)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: PretrainedConfig, shape: ModelShape, layer: int, dtype, device):
        super().__init__()
        self.self_attn = Attention(cfg, shape, layer, dtype, device)
        self.mlp = MLP(cfg, shape, layer, dtype, device)
        eps = cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(shape.hidden_size, eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, eps, dtype, device)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata,
                kv: Tensor, lora: LoraHook | None) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, meta, kv, lora)
        return h + self.mlp(self.post_attention_layernorm(h), lora)


class Embedding(nn.Module):
    def __init__(self, vocab: int, dim: int, dtype, device):
        super().__init__()
        self.weight = _empty(vocab, dim, dtype=dtype, device=device)


class Backbone(nn.Module):
    """transformers' ``model.`` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: PretrainedConfig, shape: ModelShape, dtype, device):
        super().__init__()
        self.embed_tokens = Embedding(shape.vocab_size, shape.hidden_size, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, shape, i, dtype, device) for i in range(shape.num_layers)
        )
        self.norm = RMSNorm(shape.hidden_size, cfg.rms_norm_eps, dtype, device)


class LlamaForServing(nn.Module):
    """Decoder over a flattened multi-sequence batch with a paged KV cache.

    Parameters are allocated uninitialised on ``device``; use :meth:`from_checkpoint` (or
    :func:`serving.engine.weights.load_weights`) to fill them.
    """

    def __init__(self, hf_config: dict | PretrainedConfig, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        super().__init__()
        cfg = hf_config_object(hf_config)
        self.config = cfg
        self.dtype = dtype
        self.shape = ModelShape.from_hf_config(cfg.to_dict())
        self.model = Backbone(cfg, self.shape, dtype, device)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = Embedding(self.shape.vocab_size, self.shape.hidden_size, dtype, device)
        self.rotary = RotaryEmbedding(cfg, self.shape.head_dim, device)
        self.head_packed: PackedWeight | None = None

    def pack_weights(self, enabled: bool = True) -> int:
        """Give every projection and the LM head a oneDNN-packed copy of its weight (CPU
        float32 or bfloat16; see packed_linear.py), or drop the copies. Returns how many were
        packed."""
        linears = [m for m in self.modules() if isinstance(m, AdapterLinear)]
        for m in linears:
            m.packed = pack_weight(m.weight) if enabled else None
        self.head_packed = pack_weight(self._head().weight) if enabled else None
        return sum(m.packed is not None for m in linears) + (self.head_packed is not None)

    def packed_bytes(self) -> int:
        """Bytes held by the packed copies (their weights' bytes)."""
        packs = [m.packed for m in self.modules() if isinstance(m, AdapterLinear)]
        packs.append(self.head_packed)
        return sum(p.source.numel() * p.source.element_size() for p in packs if p is not None)

    def _head(self) -> Embedding:
        return self.model.embed_tokens if self.tie_word_embeddings else self.lm_head

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> LlamaForServing:
        """Build from a local HF checkpoint directory (config.json + *.safetensors)."""
        model = cls(read_config(path), dtype=dtype, device=device)
        load_weights(model, path)
        return model

    def forward(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata,
                kv: Tensor, lora: LoraHook | None = None) -> Tensor:
        """Final-normed hidden states [T, hidden] for the flat batch ``input_ids`` [T].

        ``kv`` is the pool view [num_pages, num_layers, 2, block_size, kv_heads, head_dim];
        the new tokens' K/V are written into it.
        """
        h = F.embedding(input_ids, self.model.embed_tokens.weight)
        # One cos/sin table per step, shared by all layers.
        cos, sin = self.rotary(positions, h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, meta, kv, lora)
        return self.model.norm(h)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """fp32 logits [N, vocab] for hidden states [N, hidden] (e.g. each sequence's last)."""
        if self.head_packed is not None and self.head_packed.usable(hidden):
            return self.head_packed.linear(hidden).float()
        return F.linear(hidden, self._head().weight).float()


def hf_config_object(hf_config: dict | PretrainedConfig) -> PretrainedConfig:
    """The transformers config class for a config.json dict (RoPE helpers need one)."""
    if isinstance(hf_config, PretrainedConfig):
        cfg = hf_config
    else:
        model_type = hf_config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} unsupported; have {SUPPORTED_MODEL_TYPES}")
        cfg = CONFIG_MAPPING[model_type].from_dict(hf_config)
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {cfg.model_type!r} unsupported; have {SUPPORTED_MODEL_TYPES}")
    return cfg


def _attention_biases(cfg: PretrainedConfig) -> tuple[bool, bool]:
    """(q/k/v bias, o bias) as each family's transformers module defines them."""
    if cfg.model_type == "qwen2":
        return True, False
    if cfg.model_type == "llama":
        bias = bool(getattr(cfg, "attention_bias", False))
        return bias, bias
    return False, False


def _sliding_window(cfg: PretrainedConfig, layer: int) -> int | None:
    # Qwen2 marks sliding layers in layer_types; Mistral applies its window to every layer.
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types is not None and layer_types[layer] != "sliding_attention":
        return None
    return getattr(cfg, "sliding_window", None)
