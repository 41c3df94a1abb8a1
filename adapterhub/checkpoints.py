"""Loading local Hugging Face Llama-family checkpoint directories (safetensors only).

The hub is never contacted: a base model is always a directory on disk holding
config.json, *.safetensors and tokenizer files. Optionally the linear layers are quantized
to NF4 with bitsandbytes (QLoRA), which runs on CPU as well as CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adapterhub.errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
QUANTIZATIONS = ("nf4",)


def read_base_config(path: str | Path) -> dict:
    """Validate a checkpoint directory and return its config.json as a dict."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"base model directory not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: config.json is missing")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"unreadable {config_file}: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found {', '.join(pickled)}: pickle files are never loaded)" if pickled else ""
        raise CheckpointError(f"{path}: no *.safetensors weights{hint}")
    return config


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the checkpoint's tokenizer; generation needs BOS, EOS and a pad token."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises many types for a broken tokenizer dir
        raise CheckpointError(f"{path}: cannot load tokenizer ({exc})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_base_model(
    path: str | Path,
    *,
    quantize: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """Load the base model in eval mode; ``quantize='nf4'`` gives a 4-bit QLoRA base."""
    read_base_config(path)
    kwargs: dict = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
    if quantize is not None:
        if quantize not in QUANTIZATIONS:
            raise CheckpointError(
                f"unknown quantization {quantize!r} (supported: {', '.join(QUANTIZATIONS)})"
            )
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
        )
        kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # corrupt weights surface as several exception types
        raise CheckpointError(f"{path}: cannot load weights ({exc})") from None
    if quantize is None:
        model.to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_base(
    path: str | Path,
    *,
    quantize: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a checkpoint directory's model and tokenizer."""
    model = load_base_model(path, quantize=quantize, device=device, dtype=dtype)
    return model, load_tokenizer(path)
