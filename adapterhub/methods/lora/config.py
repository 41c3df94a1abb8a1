"""LoRA hyperparameters (the math itself is Hugging Face PEFT's)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from adapterhub.methods.config_base import (
    DEFAULT_TARGET_MODULES,
    MethodConfig,
    TargetModules,
    check_int,
    require,
)


@dataclasses.dataclass
class LoraConfig(MethodConfig):
    """Plain LoRA: ``y = W0 x + scaling * B A dropout(x)`` (+ ``scaling * b`` with lora_bias).

    ``scaling`` is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``. ``rank_pattern`` and
    ``alpha_pattern`` are PEFT's per-module overrides (keys are module-name regexes); they exist so
    that any plain PEFT LoRA directory, including our own exports, loads without loss.
    """

    method: ClassVar[str] = "lora"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: TargetModules = DEFAULT_TARGET_MODULES
    use_rslora: bool = False
    lora_bias: bool = False
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)

    def validate(self) -> None:
        check_int("r", self.r, 1)
        require(isinstance(self.use_rslora, bool), "use_rslora must be a bool")
        require(isinstance(self.lora_bias, bool), "lora_bias must be a bool")
        require(isinstance(self.rank_pattern, dict), "rank_pattern must be a dict")
        require(isinstance(self.alpha_pattern, dict), "alpha_pattern must be a dict")
        for key, rank in self.rank_pattern.items():
            check_int(f"rank_pattern[{key!r}]", rank, 1)
