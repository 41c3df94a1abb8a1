"""What a fine-tune job looks like to callers: its state enum and the ``Job`` record."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from adapterhub.finetune import FinetuneJob


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


@dataclass
class Job:
    """A snapshot of one persisted job; ``revision`` grows by one on every change."""

    id: str
    spec: FinetuneJob
    state: JobState
    total_steps: int
    step: int = 0
    loss: float | None = None
    tokens_per_s: float | None = None
    error: str | None = None
    run_id: str | None = None
    adapter_ref: str | None = None  # "name/version" once succeeded
    placement: str | None = None  # where it trains: "co_serve" or "dedicated"
    metrics: dict[str, float] = field(default_factory=dict)
    cancel_requested: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    revision: int = 0

    @property
    def is_final(self) -> bool:
        return self.state.is_final

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able view (spec as ``FinetuneJob.to_dict()``, state as its string)."""
        return {
            "id": self.id,
            "spec": self.spec.to_dict(),
            "state": self.state.value,
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": self.loss,
            "tokens_per_s": self.tokens_per_s,
            "error": self.error,
            "run_id": self.run_id,
            "adapter_ref": self.adapter_ref,
            "placement": self.placement,
            "metrics": dict(self.metrics),
            "cancel_requested": self.cancel_requested,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "revision": self.revision,
        }
