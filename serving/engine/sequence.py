"""One request's state as it moves through the engine."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

import torch

from serving.engine.sampling import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    ABORTED = "aborted"
    DEADLINE = "deadline"
    ERROR = "error"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    deadline: float | None = None  # time.monotonic() value
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the pool
    finish_reason: FinishReason | None = None
    error: str | None = None
    output_text: str = ""
    arrival: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    generator: torch.Generator | None = None
    preemptions: int = 0
    pinned: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        return (self.prompt_ids + self.output_ids)[start:end]

    @property
    def is_prefill(self) -> bool:
        """True until every token but the newest has its K/V cached."""
        return self.num_cached < self.num_tokens - 1 or not self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
