"""Conversion between our LoraConfig and PEFT's LoRA config (object or adapter_config.json)."""

from __future__ import annotations

from typing import Any

import peft

from adapterhub.errors import AdapterError
from adapterhub.methods.lora.config import LoraConfig

# PEFT options with no counterpart here, with their "off" values: a file that turns one on is
# refused rather than loaded as something it is not.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "modules_to_save": (None, []),
    "bias": ("none", None),
    "fan_in_fan_out": (False, None),
    "layers_to_transform": (None, []),
    "exclude_modules": (None, [], ""),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, [], {}),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "use_qalora": (False, None),
}


def to_peft_config(config: LoraConfig) -> peft.LoraConfig:
    """The equivalent ``peft.LoraConfig`` for a causal LM."""
    targets = config.target_modules
    return peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        use_rslora=config.use_rslora, lora_bias=config.lora_bias, bias="none",
        rank_pattern=dict(config.rank_pattern), alpha_pattern=dict(config.alpha_pattern),
        task_type="CAUSAL_LM",
    )


def from_peft_dict(d: dict[str, Any]) -> LoraConfig:
    """Our LoraConfig for a plain PEFT adapter_config.json; AdapterError if it is not LoRA."""
    peft_type = d.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"adapter_config.json is neither adapterhub nor PEFT LoRA "
                           f"(peft_type={peft_type!r})")
    for key, off in _UNSUPPORTED.items():
        if d.get(key) not in off:
            raise AdapterError(f"PEFT LoRA option {key}={d[key]!r} is not supported")
    if d.get("target_modules") in (None, [], ""):
        raise AdapterError("PEFT LoRA config names no target_modules")
    try:
        return LoraConfig(
            r=d.get("r", 8), alpha=d.get("lora_alpha", 8), dropout=d.get("lora_dropout", 0.0),
            target_modules=d["target_modules"], use_rslora=bool(d.get("use_rslora", False)),
            lora_bias=bool(d.get("lora_bias", False)),
            rank_pattern=dict(d.get("rank_pattern") or {}),
            alpha_pattern=dict(d.get("alpha_pattern") or {}),
        )
    except ValueError as exc:
        raise AdapterError(f"invalid PEFT LoRA config: {exc}") from None
