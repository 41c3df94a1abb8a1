"""The ``on_step`` hook of a running job: throttled progress writes and cancellation checks."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from adapterhub.jobs.models import Job
from adapterhub.jobs.store import JobStore

# Keys of the per-step dict; anything else run_finetune logs (eval sets) is a metric.
_STEP_KEYS = frozenset({"loss", "lr", "tokens_per_s"})


class JobCancelled(Exception):
    """Raised from on_step to stop a job whose cancellation was requested."""


class JobPreempted(Exception):
    """Raised from on_step when the manager stops; the job stays running and resumes later."""


class ProgressRecorder:
    """Called by run_finetune on every logged metric set; writes at most every ``interval`` s.

    Values seen between writes are kept, so the final write (``flush``) never loses them.
    """

    def __init__(
        self,
        store: JobStore,
        job: Job,
        state_file: Path,
        interval: float,
        cancelled: Callable[[], bool],
        stopping: Callable[[], bool],
    ) -> None:
        self.store = store
        self.job = job
        self.state_file = state_file
        self.interval = interval
        self._cancelled = cancelled
        self._stopping = stopping
        self._pending: dict = {}
        self._metrics = dict(job.metrics)
        self._last_write = 0.0
        self.run_id = job.run_id

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self._pending["step"] = int(step)
        for key in ("loss", "tokens_per_s"):
            if key in metrics:
                self._pending[key] = metrics[key]
        evals = {k: v for k, v in metrics.items() if k not in _STEP_KEYS}
        if evals:
            self._metrics.update(evals)
            self._pending["metrics"] = dict(self._metrics)
        if self.run_id is None:
            self._read_run_id()
        now = time.monotonic()
        # The first, the last and every evaluation are always written.
        due = (now - self._last_write >= self.interval or self._last_write == 0.0
               or step >= self.job.total_steps or bool(evals))
        if due:
            self.flush()
        if self._cancelled():
            raise JobCancelled()
        if self._stopping():
            raise JobPreempted()

    def flush(self, **fields) -> Job:
        """Write pending progress plus ``fields`` (e.g. a final state) in one update."""
        update = {**self._pending, **fields}
        if self.run_id is not None and "run_id" not in update:
            update["run_id"] = self.run_id
        self._pending = {}
        self._last_write = time.monotonic()
        job = self.store.update(self.job.id, **update)
        if job is not None:
            self.job = job
        return self.job

    def _read_run_id(self) -> None:
        # run_finetune records its MLflow run in <job dir>/job.json before training; reading it
        # lets watchers see the run while the job runs and lets a restart check it.
        try:
            self.run_id = json.loads(self.state_file.read_text()).get("run_id")
        except (OSError, ValueError):
            pass
