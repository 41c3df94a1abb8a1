"""Continuous batching with chunked prefill over the unified pool.

Each step has a token budget. Running sequences come first: decodes (one token each), then
prefills in progress (chunked to what the budget leaves); then waiting requests are
admitted in arrival order while their adapter pages and first chunk's KV pages fit. When
the pool runs out, idle adapters are evicted before the newest running sequence is
preempted (its KV is freed and it is recomputed later, keeping its output so far).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from serving.engine.adapter_cache import AdapterCache
from serving.engine.pool import KV, UnifiedPool
from serving.engine.sequence import Sequence, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_batched_tokens: int = 512
    watermark_pages: int = 1  # kept free at admission so running decodes can grow


@dataclass
class Batch:
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (seq, new tokens)
    decodes: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefills and not self.decodes

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefills) + len(self.decodes)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: UnifiedPool, cache: AdapterCache) -> None:
        self.config = config
        self.pool = pool
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    # -- page accounting --------------------------------------------------------------
    def _kv_pages_needed(self, seq: Sequence, n: int) -> int:
        blocks = -(-(seq.num_cached + n) // self.pool.block_size)
        return max(0, blocks - len(seq.block_table))

    def _grow(self, seq: Sequence, n: int) -> None:
        need = self._kv_pages_needed(seq, n)
        if need:
            seq.block_table.extend(self.pool.alloc(need, KV))

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's KV pages and its adapter pin (idempotent)."""
        if seq.block_table:
            self.pool.free(seq.block_table)
            seq.block_table = []
        seq.num_cached = 0
        if seq.pinned and seq.adapter:
            self.cache.unpin(seq.adapter)
        seq.pinned = False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.release(seq)
        seq.status = Status.WAITING
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _make_room(self, need: int, protect: set[str]) -> bool:
        """Free pages by evicting idle adapters, then preempting the newest running
        sequences not in ``protect``; False when nothing more can be freed."""
        while self.pool.num_free < need:
            if self.cache.evict_one():
                continue
            victims = [s for s in self.running if s.request_id not in protect]
            if not victims:
                return False
            self._preempt(victims[-1])
        return True

    # -- the step plan ----------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a finished/aborted sequence from the queues and free its pages at once."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.release(seq)

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.config.max_batched_tokens
        scheduled: set[str] = set()
        decodes = [s for s in self.running if not s.is_prefill]
        prefills = [s for s in self.running if s.is_prefill]
        for seq in decodes + prefills:
            if budget <= 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted while making room for an older sequence
            n = min(seq.num_tokens - seq.num_cached, budget)
            scheduled.add(seq.request_id)
            if not self._make_room(self._kv_pages_needed(seq, n), scheduled):
                scheduled.discard(seq.request_id)
                self._preempt(seq)
                continue
            self._grow(seq, n)
            budget -= n
            if seq.is_prefill:
                batch.prefills.append((seq, n))
            else:
                batch.decodes.append(seq)
        batch.decodes = [s for s in batch.decodes if s.status is Status.RUNNING]
        batch.prefills = [(s, n) for s, n in batch.prefills if s.status is Status.RUNNING]
        self._admit(batch, budget)
        return batch

    def _admit(self, batch: Batch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens, budget)
            adapter_pages = self.cache.pages_needed(seq.adapter) if seq.adapter else 0
            kv_pages = self._kv_pages_needed(seq, n)
            need = adapter_pages + kv_pages + self.config.watermark_pages
            # Admission counts both kinds of pages; only idle adapters may be evicted for it.
            if self.pool.num_free + self.cache.evictable_pages() < need:
                break
            if seq.adapter:
                if not self.cache.load(seq.adapter):
                    break
                self.cache.pin(seq.adapter)
                seq.pinned = True
            while self.pool.num_free < kv_pages and self.cache.evict_one():
                pass
            if self.pool.num_free < kv_pages:
                self.release(seq)
                break
            self.waiting.popleft()
            self._grow(seq, n)
            seq.status = Status.RUNNING
            if seq.scheduled_at is None:
                seq.scheduled_at = time.monotonic()
            self.running.append(seq)
            batch.prefills.append((seq, n))
            budget -= n
        queued = [s.adapter for s in list(self.waiting)[:8] if s.adapter]
        self.cache.prefetch(queued, reserve_pages=self.config.watermark_pages + 1)

    def after_step(self, batch: Batch) -> None:
        for seq, n in batch.prefills:
            seq.num_cached += n
        for seq in batch.decodes:
            seq.num_cached += 1
