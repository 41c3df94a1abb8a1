"""MoS (Mixture of Shards) hyperparameters and their consistency rules."""

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
class MoSConfig(MethodConfig):
    """Mixture of Shards: every layer's LoRA factors are gathered from one pool per projection type.

    Per projection type (all ``q_proj`` across the L layers, ...) the pools hold
    ``e * L * l`` shards of width ``d_in / l`` (for A) and ``d_out / l`` (for B), so the trainable
    parameter count is ``e * L * (d_in + d_out)`` whatever the rank ``r``. Each rank vector is the
    concatenation of ``l`` shards; the last ``p`` vectors of a layer use shards private to it, the
    first ``r - p`` use shards drawn (fixed, seeded by ``seed``) from the shared public part.
    With ``p == e == r`` nothing is shared and MoS is exactly LoRA of rank r.
    """

    method: ClassVar[str] = "mos"

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: TargetModules = DEFAULT_TARGET_MODULES
    shards_per_vector: int = 2
    pool_vectors_per_layer: int = 4
    private_rank: int = 1
    seed: int = 0
    use_rslora: bool = False

    def validate(self) -> None:
        check_int("r", self.r, 1)
        check_int("shards_per_vector", self.shards_per_vector, 1)
        check_int("pool_vectors_per_layer", self.pool_vectors_per_layer, 1)
        check_int("private_rank", self.private_rank, 0)
        check_int("seed", self.seed, 0)
        require(isinstance(self.use_rslora, bool), "use_rslora must be a bool")
        p, e, r = self.private_rank, self.pool_vectors_per_layer, self.r
        require(p <= r, f"private_rank ({p}) must be <= r ({r})")
        require(p <= e, f"private_rank ({p}) must be <= pool_vectors_per_layer ({e})")
        # Public rank vectors need a public pool to draw from.
        require(
            r == p or e > p,
            f"r ({r}) > private_rank ({p}) needs pool_vectors_per_layer > private_rank, got {e}",
        )
