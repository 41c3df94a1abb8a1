"""What the engine hands back per request: a streamed delta or the final result."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)  # everything so far (for convenience)
    text: str = ""
    prompt_tokens: int = 0
    queue_s: float | None = None  # arrival until first scheduled
    ttft_s: float | None = None
    latency_s: float | None = None
