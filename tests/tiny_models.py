"""Tiny random Llama-family checkpoints for tests (the hub is unreachable, so we build them)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
)

from adapterhub.tokenizer import save_char_tokenizer

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,  # NF4 on CPU needs in_features % 64 == 0
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    # Larger than HF's 0.02 so the random model's logits span a useful range and adapters
    # can visibly learn on it in a few steps.
    initializer_range=0.1,
)


def tiny_config(family: str, vocab_size: int) -> PretrainedConfig:
    """A small config per family covering the features the engine must handle."""
    if family == "llama":
        # Plain multi-head attention, untied embeddings, RoPE scaling.
        return LlamaConfig(
            vocab_size=vocab_size, num_key_value_heads=4, tie_word_embeddings=False,
            rope_scaling={"rope_type": "linear", "factor": 2.0}, **_COMMON,
        )
    if family == "mistral":
        # Grouped-query attention.
        return MistralConfig(
            vocab_size=vocab_size, num_key_value_heads=2, tie_word_embeddings=False,
            sliding_window=None, **_COMMON,
        )
    if family == "qwen2":
        # QKV bias and tied embeddings.
        return Qwen2Config(
            vocab_size=vocab_size, num_key_value_heads=2, tie_word_embeddings=True, **_COMMON,
        )
    raise ValueError(f"unknown family {family!r}")


def build_tiny_checkpoint(path: Path, family: str, seed: int = 0) -> Path:
    """Write a random checkpoint (safetensors + char tokenizer) to ``path`` and return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(path)
    torch.manual_seed(seed)
    config = tiny_config(family, vocab_size=len(tok))
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if family == "qwen2":
        # Random init leaves biases at zero; make them non-zero so bias paths are exercised.
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.02)
    model.save_pretrained(path, safe_serialization=True)
    return path
