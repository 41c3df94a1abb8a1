"""The fine-tuning share of each iteration: an SLO controller and a fair split between jobs.

``SloController`` turns the engine's token budget into the fine-tuning allowance of one
iteration: what inference leaves (decode and prefill tokens come first), scaled by a
factor that is halved when inference misses a latency target (time per output token, time
to first token) and grows back additively while targets are met (AIMD, as TCP does with a
congestion window), never below ``min_share`` of the budget.

``FairShare`` splits an allowance between jobs by deficit round robin: each ready job's
deficit grows by its weighted quantum every round and pays for the slices it runs, so jobs
with long sequences are not starved by jobs with short ones and nobody gets more than its
share over time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Sequence

from serving.engine.coserve.config import CoserveConfig


class SloController:
    # The targets are on p90s over requests, so the controller reads smoothed signals, not
    # single samples: an exponential average of inter-token times, and the p90 of the last
    # TTFT_WINDOW first-token latencies.
    TPOT_SMOOTHING = 0.2
    TTFT_WINDOW = 16

    def __init__(self, config: CoserveConfig) -> None:
        self.config = config
        self.scale = 1.0
        self.misses = 0
        self._cooldown = 0
        self.tpot_avg: float | None = None
        self._ttfts: deque[float] = deque(maxlen=self.TTFT_WINDOW)

    def allowance(self, budget: int, inference_tokens: int) -> int:
        """Fine-tuning tokens this iteration may run, given inference's share of ``budget``
        (in budget units: an inference token is one, a fine-tuning token ``ft_token_cost``)."""
        cfg = self.config
        floor = cfg.min_share * budget
        units = max(floor, self.scale * max(0, budget - inference_tokens))
        return int(units / cfg.ft_token_cost + 1e-9)  # 0.07 * 100 is 7.000...1, not 7

    def observe(self, tpot_s: float | None = None, ttfts_s: Sequence[float] = ()) -> bool:
        """Feed one iteration's latencies (an inter-token time of its decodes, the first-token
        times of requests it started); returns whether a target was missed."""
        cfg = self.config
        miss = False
        if tpot_s is not None:
            avg = self.tpot_avg
            self.tpot_avg = tpot_s if avg is None else avg + self.TPOT_SMOOTHING * (tpot_s - avg)
            miss |= cfg.tpot_slo_s is not None and self.tpot_avg > cfg.tpot_slo_s
        if ttfts_s:
            self._ttfts.extend(ttfts_s)
            miss |= cfg.ttft_slo_s is not None and pct90(self._ttfts) > cfg.ttft_slo_s
        if miss:
            self.misses += 1
            if not self._cooldown:
                self.scale *= cfg.decrease
                self._cooldown = cfg.cooldown_iters
                return miss
        else:
            self.scale = min(1.0, self.scale + cfg.increase)
        if self._cooldown:
            self._cooldown -= 1
        return miss


def pct90(xs: Sequence[float]) -> float:
    ordered = sorted(xs)
    k = (len(ordered) - 1) * 0.9
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class FairShare:
    """Deficit round robin over jobs (keys), in tokens."""

    def __init__(self) -> None:
        self.deficit: dict[Hashable, float] = {}
        self.served: dict[Hashable, int] = {}
        self._round = 0

    def grant(self, allowance: int, jobs: Sequence[tuple[Hashable, float, int]]
              ) -> list[tuple[Hashable, int]]:
        """Add this round's quanta; return (key, token limit) per job in serving order.

        ``jobs`` holds (key, weight, cost of its next indivisible slice) of every job that
        can run now. A deficit is capped at the quantum plus that cost, so rounds a job
        could not use are not saved up into a burst.
        """
        if not jobs:
            return []
        total = sum(w for _, w, _ in jobs)
        start = self._round % len(jobs)
        self._round += 1
        order = list(jobs[start:]) + list(jobs[:start])  # who goes first rotates
        out = []
        for key, weight, next_cost in order:
            quantum = allowance * weight / total
            d = min(self.deficit.get(key, 0.0) + quantum, quantum + next_cost)
            self.deficit[key] = d
            out.append((key, int(d)))
        return out

    def forget(self, key: Hashable) -> None:
        """A job with nothing to run (paused, gone) loses its deficit, as in DRR."""
        self.deficit.pop(key, None)

    def charge(self, key: Hashable, tokens: int) -> None:
        self.deficit[key] = self.deficit.get(key, 0.0) - tokens
        self.served[key] = self.served.get(key, 0) + tokens
