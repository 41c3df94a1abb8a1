"""The engine hook of co-serving: plan and run each iteration's fine-tuning slices.

``Engine._step`` calls ``begin(batch)`` once inference is scheduled and ``end(it)`` once
its tokens are sampled. The iteration's fine-tuning allowance is what the SLO controller
grants from the token budget inference left; it is split between jobs by deficit round
robin, and each job's slice is cut to the sequences that fit its share and the free pool
pages (reserved for the slice's activations until it ends).

Slices run either on the engine thread after the inference forward (``overlap=False``, and
always for jobs with dropout), or on one helper thread started in ``begin``, concurrently
with the inference forward; a helper slice may outlast the iteration, and the next one is
planned once it is done. On CPU the helper thread hands a slice's forward and backward to
a worker process over the same (shared-memory) weights and waits for it (worker.py).
Either way a slice's failure fails its job, never the engine.
Jobs are attached and detached from other threads; the pool is touched only by the engine
thread.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from serving.engine.coserve.budget import FairShare, SloController
from serving.engine.coserve.config import CoserveConfig
from serving.engine.coserve.memory import ActivationMeter
from serving.engine.coserve.trainee import State, Trainee
from serving.engine.coserve.worker import (
    RemoteSlices,
    SliceWorker,
    share_in_place,
    shm_room,
    unshared_bytes,
)
from serving.engine.pool import ACTIVATION
from serving.engine.scheduler import Batch
from serving.engine.sequence import Sequence

log = logging.getLogger(__name__)

# A helper slice spans iterations, and each iteration it spans lends the next helper slice
# its allowance, up to this many iterations' worth of the whole budget: slices grow to
# whole micro-batches (fewer hand-offs, larger GEMMs) without taking more than their share.
BANK_ITERS = 8
# How long an engine step with no inference waits for a helper slice to end (or for a
# request to arrive, which wakes it at once) before it returns to the loop.
IDLE_WAIT_S = 0.05


@dataclass
class Slice:
    trainee: Trainee
    rows: int
    cost: int  # padded tokens: what the budget and the activation estimate count
    pages: list[int]
    meter: ActivationMeter


@dataclass
class Iteration:
    started: float
    inference_tokens: int
    had_decodes: bool
    prefills: list[Sequence]
    inline: list[Slice] = field(default_factory=list)
    planned: int = 0


class CoServer:
    def __init__(self, engine, config: CoserveConfig | None = None) -> None:
        self.engine = engine
        self.pool = engine.pool
        self.config = config or CoserveConfig()
        self.slo = SloController(self.config)
        self.fair = FairShare()
        self.trainees: list[Trainee] = []
        self._meters: dict[int, ActivationMeter] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._executor: ThreadPoolExecutor | None = None
        self._inflight: Future | None = None
        self._done_pages: list[list[int]] = []
        self._last_end: float | None = None
        self._bank = 0  # allowance lent by iterations a helper slice spanned (BANK_ITERS)
        self.iterations = 0
        self.slices = 0
        self.memory_waits = 0  # slices that fitted the budget but not the free pages
        self.chained = 0  # helper slices that followed the one before at once (_extend)
        self._releases: list[RemoteSlices] = []
        self.helper = self._helper_mode()
        self.worker = SliceWorker.shared() if self.helper == "process" else None
        if self.worker is not None:
            self.worker.ensure_started()  # it imports while no job waits for it yet

    def _helper_mode(self) -> str:
        """Where overlapped slices compute; "process" moves the base weights to shared
        memory now, before the engine serves (the move swaps their memory under readers)."""
        cfg = self.config
        model = self.engine.runner.model
        on_cpu = next(model.parameters()).device.type == "cpu"
        if not cfg.overlap or cfg.helper == "thread" or (cfg.helper == "auto" and not on_cpu):
            return "thread"
        if not on_cpu:
            raise ValueError("helper='process' needs the engine on CPU")
        need, room = unshared_bytes(model), shm_room()
        if room is not None and need > room:
            log.warning("co-serving: %d MiB of base weights do not fit the %d MiB free in "
                        "/dev/shm; fine-tuning slices run on the helper thread instead of a "
                        "worker process", need >> 20, room >> 20)
            return "thread"
        share_in_place(model)
        return "process"

    @property
    def budget(self) -> int:
        """The engine's per-iteration token budget (read live)."""
        return self.engine.scheduler.config.max_batched_tokens

    # -- jobs (any thread) ----------------------------------------------------------------
    def attach(self, trainee: Trainee) -> None:
        meter = ActivationMeter(self.engine.shape, self.engine.config.dtype,
                                self.config.activation_margin)
        if self.worker is not None and self._overlaps(trainee):
            self.worker.ensure_started()  # restarts one that died
            if trainee.remote is None:
                trainee.remote = RemoteSlices(self.worker, trainee.adapter)
        with self._lock:
            if len(self.trainees) >= self.config.max_jobs:
                raise RuntimeError(f"{len(self.trainees)} fine-tune jobs already co-served "
                                   f"(max {self.config.max_jobs})")
            trainee.detached = False
            trainee.removed.clear()
            self.trainees.append(trainee)
            self._meters[id(trainee)] = meter
        self.wake()

    def detach(self, trainee: Trainee, timeout: float | None = 60.0) -> bool:
        """Stop scheduling ``trainee``; returns once no slice of it runs (False on timeout)."""
        with self._lock:
            trainee.detached = True
            if trainee not in self.trainees:
                return True
            if not trainee.busy:
                self._remove(trainee)  # sets trainee.removed
        removed = trainee.removed.wait(timeout)
        self._release()
        return removed

    def _remove(self, trainee: Trainee) -> None:  # under self._lock
        self.trainees.remove(trainee)
        self._meters.pop(id(trainee), None)
        self.fair.forget(id(trainee))
        if trainee.remote is not None:
            self._releases.append(trainee.remote)
        trainee.removed.set()

    def _release(self) -> None:
        """Drop removed jobs' models from the worker; never on the engine thread (it waits
        for the worker's current slice)."""
        with self._lock:
            releases, self._releases = self._releases, []
        for remote in releases:
            remote.release()

    def wake(self) -> None:
        """A request arrived or a job changed: an idle step waiting on fine-tuning returns."""
        self._wake.set()

    def has_work(self) -> bool:
        return self._inflight is not None or any(
            t.state is State.RUNNING and not t.detached for t in self.trainees)

    def helper_busy(self) -> bool:
        """Whether an overlapped slice is computing beside the engine's thread: it has the
        spare core, so the engine's LoRA worker stands aside (lora_worker.py)."""
        return self._inflight is not None and not self._inflight.done()

    # -- the engine iteration (engine thread) -----------------------------------------
    def begin(self, batch: Batch) -> Iteration:
        self._wake.clear()
        self._free_done()
        it = Iteration(time.monotonic(), batch.num_tokens, bool(batch.decodes),
                       [s for s, _ in batch.prefills])
        if self._inflight is not None and self._inflight.done():
            self._inflight = None
        if not self.trainees:
            return it
        allowance = self.slo.allowance(self.budget, it.inference_tokens)
        helper_free = self._inflight is None
        with self._lock:  # the helper's _extend spends the bank
            if not helper_free:
                cap = BANK_ITERS * self.budget / self.config.ft_token_cost
                self._bank = int(min(self._bank + allowance, cap))
            bank = self._bank if helper_free else 0
        slices = self._plan(allowance + bank, helper_free)
        it.planned = len(slices)
        helper = [s for s in slices if self._overlaps(s.trainee)]
        it.inline = [s for s in slices if not self._overlaps(s.trainee)]
        if helper:
            with self._lock:
                self._bank = 0
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="coserve")
            self._inflight = self._executor.submit(self._run_all, helper)
        return it

    def end(self, it: Iteration) -> None:
        for s in it.inline:
            self._run(s)
        self._free_done()
        self.iterations += 1
        now = time.monotonic()
        if it.inference_tokens:
            tpot = now - self._last_end if it.had_decodes and self._last_end else None
            ttfts = [now - s.arrival for s in it.prefills
                     if s.first_token_at is not None and s.first_token_at >= it.started]
            # A miss shrinks what later iterations grant (the controller's scale); the bank,
            # already granted by iterations that had room, is kept: emptying it too left the
            # worker idle between slices (busy 0.70-0.88 of the heavy-rate replay against
            # 0.95 in alternating runs of bench/coserve.py --quick), and latency was no
            # better for it.
            self.slo.observe(tpot, ttfts)
            self._last_end = now
            return
        self._last_end = None
        self.slo.observe()
        if self._inflight is not None or not it.planned and self.has_work():
            # Nothing for inference to do: wait for the helper's slice (or for memory)
            # instead of spinning; an arriving request ends the wait at once.
            self._wake.wait(IDLE_WAIT_S if self._inflight is not None else IDLE_WAIT_S / 5)

    def _overlaps(self, trainee: Trainee) -> bool:
        return self.config.overlap and not trainee.uses_rng

    def _plan(self, allowance: int, helper_free: bool) -> list[Slice]:
        page_bytes = self.pool.page_elems * self.pool.storage.element_size()
        with self._lock:
            ready = []
            for t in self.trainees:
                if t.state is not State.RUNNING or t.detached:
                    self.fair.forget(id(t))
                elif not t.busy and (helper_free or not self._overlaps(t)):
                    ready.append(t)
            by_key = {id(t): t for t in ready}
            grants = self.fair.grant(allowance, [(id(t), t.weight, t.next_cost()) for t in ready])
            free = self.pool.num_free - self.engine.config.watermark_pages
            slices = []
            for key, limit in grants:
                t, meter = by_key[key], self._meters[key]
                k, cost = t.select(min(limit, meter.tokens_for(max(0, free), page_bytes)))
                if k == 0:
                    if t.select(limit)[0] > 0:  # the budget allows it, the free pages do not
                        self.memory_waits += 1
                        self._check_fits(t, meter, page_bytes)
                    continue
                n = meter.pages(cost, page_bytes)
                slices.append(Slice(t, k, cost, self.pool.alloc(n, ACTIVATION), meter))
                free -= n
                self.fair.charge(key, cost)
                t.busy = True
        return slices

    def _check_fits(self, t: Trainee, meter: ActivationMeter, page_bytes: int) -> None:
        # Waiting helps only if the smallest slice fits the whole pool (under self._lock).
        need = meter.pages(t.next_cost(), page_bytes)
        usable = self.pool.num_pages - self.engine.config.watermark_pages
        if need > usable:
            t.fail(MemoryError(
                f"a slice of fine-tune job {t.name!r} needs {need} pool pages for its "
                f"activations and the pool has {usable}: give the engine a larger pool, "
                "shorter sequences or a dedicated placement"))
            self._remove(t)

    def _run_all(self, slices: list[Slice]) -> None:  # on the helper thread
        for s in slices:
            self._run(s, chain=len(slices) == 1)
        self._release()

    def _run(self, s: Slice, chain: bool = False) -> None:
        try:
            while True:
                measure = s.meter.wants(s.cost)
                s.trainee.run(s.rows, measure)
                if measure:
                    s.meter.record(s.cost, s.trainee.saved_bytes)
                if not (chain and self._extend(s)):
                    break
        except Exception as exc:  # the job fails; the engine and other jobs go on
            log.exception("fine-tuning slice of %s failed", s.trainee.name)
            s.trainee.fail(exc)
        finally:
            with self._lock:
                self.slices += 1
                s.trainee.busy = False
                self._done_pages.append(s.pages)  # freed by the engine thread
                if s.trainee.detached or s.trainee.state in (State.DONE, State.FAILED):
                    if s.trainee in self.trainees:
                        self._remove(s.trainee)
            self._wake.set()

    def _extend(self, s: Slice) -> bool:
        """Make ``s`` the next slice of its job, on the pages it holds and paid from the bank,
        when that job is the only one and its next micro-batch fits both: the helper goes on
        at once instead of idling until the engine's next iteration plans it (up to a step)."""
        t = s.trainee
        page_bytes = self.pool.page_elems * self.pool.storage.element_size()
        with self._lock:
            running = [x for x in self.trainees if x.state is State.RUNNING and not x.detached]
            if running != [t]:  # several jobs: their fair share is planned by the engine
                return False
            # The whole rest of the micro-batch or nothing: smaller pieces are slower per
            # token, and the engine plans those as before.
            k, cost = t.select(1 << 30)
            if k == 0 or cost > min(self._bank, s.meter.tokens_for(len(s.pages), page_bytes)):
                return False
            self._bank -= cost
            self.fair.charge(id(t), cost)
            self.slices += 1
            self.chained += 1
            s.rows, s.cost = k, cost
        return True

    def _free_done(self) -> None:
        with self._lock:
            done, self._done_pages = self._done_pages, []
        for pages in done:
            self.pool.free(pages)

    def close(self) -> None:
        """Wait for a running helper slice, stop the helper thread, drop jobs from the worker."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._inflight = None
        self._free_done()
        with self._lock:
            self._releases += [t.remote for t in self.trainees if t.remote is not None]
        self._release()  # the worker itself is shared by the process's co-servers

    def stats(self) -> dict:
        return {
            "jobs": len(self.trainees),
            "share_scale": round(self.slo.scale, 4),
            "slo_misses": self.slo.misses,
            "slices": self.slices,
            "memory_waits": self.memory_waits,
            "chained_slices": self.chained,
            "helper": self.helper if self.config.overlap else "inline",
            "tokens_trained": {t.name: t.tokens_trained for t in list(self.trainees)},
        }
