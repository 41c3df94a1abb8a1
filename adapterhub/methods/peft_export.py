"""Writing low-rank deltas as a plain PEFT LoRA directory (stock ``PeftModel`` loads it)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file

from adapterhub.methods.config_base import TargetModules
from adapterhub.methods.files import WEIGHTS_NAME
from adapterhub.methods.lowrank import LowRankDelta

# PEFT's on-disk keys: "base_model.model." + module path, adapter name dropped.
PEFT_PREFIX = "base_model.model."


def peft_lora_tensors(deltas: dict[str, LowRankDelta]) -> dict[str, torch.Tensor]:
    """PEFT state dict for ``deltas``; every lora_B gets a bias when any delta has one."""
    with_bias = any(d.bias is not None for d in deltas.values())
    out: dict[str, torch.Tensor] = {}
    for name, d in deltas.items():
        key = PEFT_PREFIX + name
        out[f"{key}.lora_A.weight"] = d.A
        out[f"{key}.lora_B.weight"] = d.B
        if with_bias:
            bias = d.bias if d.bias is not None else d.B.new_zeros(d.B.shape[0])
            out[f"{key}.lora_B.bias"] = bias
    return out


def peft_lora_config(
    deltas: dict[str, LowRankDelta], target_modules: TargetModules, base_name: str,
    dropout: float,
) -> peft.LoraConfig:
    """A config under which PEFT's scaling is 1 for every module (lora_alpha == r)."""
    ranks = {name: d.rank for name, d in deltas.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    # Patterns are regexes matched against module-path suffixes, so escape the dots.
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    return peft.LoraConfig(
        r=r, lora_alpha=r, lora_dropout=dropout, target_modules=targets,
        use_rslora=False, bias="none",
        lora_bias=any(d.bias is not None for d in deltas.values()),
        rank_pattern=pattern, alpha_pattern=dict(pattern),
        task_type="CAUSAL_LM", base_model_name_or_path=base_name or None,
    )


def write_peft_lora(
    path: Path, deltas: dict[str, LowRankDelta], target_modules: TargetModules, base_name: str,
    dropout: float,
) -> None:
    """Write ``deltas`` to ``path`` as adapter_config.json + adapter_model.safetensors."""
    path.mkdir(parents=True, exist_ok=True)
    peft_lora_config(deltas, target_modules, base_name, dropout).save_pretrained(str(path))
    tensors = {k: t.detach().contiguous().cpu() for k, t in peft_lora_tensors(deltas).items()}
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
