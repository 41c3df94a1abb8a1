"""Hydra hyperparameters: ranks of the parallel and the sequential branch."""

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
class HydraConfig(MethodConfig):
    """Hydra: ``y = h + s * B_p A_p x + s * B_s A_s h`` with ``h = W0 x + b0`` the base output.

    ``s = alpha / (r_parallel + r_sequential)`` (or over the square root with ``use_rslora``).
    Either branch may have rank 0, not both.
    """

    method: ClassVar[str] = "hydra"

    r_parallel: int = 8
    r_sequential: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: TargetModules = DEFAULT_TARGET_MODULES
    use_rslora: bool = False

    def validate(self) -> None:
        check_int("r_parallel", self.r_parallel, 0)
        check_int("r_sequential", self.r_sequential, 0)
        require(self.rank > 0, "r_parallel + r_sequential must be positive")
        require(isinstance(self.use_rslora, bool), "use_rslora must be a bool")

    @property
    def rank(self) -> int:
        """Rank of the equivalent LoRA."""
        return self.r_parallel + self.r_sequential
