"""Co-serving knobs: how much of each iteration fine-tuning may take, and latency targets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CoserveConfig:
    # Fraction of the engine's per-iteration token budget (max_batched_tokens) that
    # fine-tuning gets while a job has work, however loaded inference is.
    min_share: float = 0.05
    # Budget units one fine-tuning token costs: its forward and backward are about three
    # forwards of an inference token.
    ft_token_cost: float = 3.0
    # Inference latency targets; None = no target (fine-tuning takes whatever inference
    # leaves of the budget). A miss halves the fine-tuning share (see budget.py).
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    # Run slices on a helper thread, concurrently with the inference forward of the same
    # iteration, instead of after it on the engine thread. It uses compute that inference
    # leaves idle (other cores; on a GPU, kernels from a second thread). Jobs with dropout
    # always run on the engine thread: dropout draws from torch's process-wide generator.
    overlap: bool = True
    # Where overlapped slices compute: "process" (a worker process over shared-memory
    # weights, so the two Python loops do not take turns on the GIL; CPU only), "thread"
    # (the helper thread itself) or "auto" (process on CPU, thread on an accelerator).
    helper: str = "auto"
    decrease: float = 0.5  # multiplicative decrease of the share on a latency miss
    increase: float = 0.05  # additive increase per iteration without a miss
    cooldown_iters: int = 4  # iterations a decrease is given to take effect before the next
    # Pool pages reserved per slice = measured activation bytes per token x this margin.
    activation_margin: float = 1.25
    max_jobs: int = 8

    def __post_init__(self) -> None:
        if self.helper not in ("auto", "process", "thread"):
            raise ValueError(f"helper must be auto, process or thread, got {self.helper!r}")
        if not 0.0 <= self.min_share <= 1.0:
            raise ValueError(f"min_share must be in [0, 1], got {self.min_share}")
        for name in ("ttft_slo_s", "tpot_slo_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0.0 < self.decrease < 1.0:
            raise ValueError(f"decrease must be in (0, 1), got {self.decrease}")
        if not 0.0 < self.increase <= 1.0:
            raise ValueError(f"increase must be in (0, 1], got {self.increase}")
        if not self.ft_token_cost > 0:
            raise ValueError(f"ft_token_cost must be positive, got {self.ft_token_cost}")
        if self.cooldown_iters < 0 or self.max_jobs < 1 or self.activation_margin < 1.0:
            raise ValueError("cooldown_iters >= 0, max_jobs >= 1 and activation_margin >= 1")
