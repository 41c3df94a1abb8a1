"""Hyper-parameters of one training run (method hyper-parameters live in the method config)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_length: int = 128
    seed: int = 0
    eval_every: int = 0  # 0 = evaluate at the end only
    checkpoint_every: int = 50
    max_new_tokens: int = 32
    eval_limit: int = 200  # held-out records scored by greedy exact match

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "grad_accum", "max_length", "max_new_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "eval_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training parameter(s): {', '.join(sorted(unknown))}")
        return cls(**d)
