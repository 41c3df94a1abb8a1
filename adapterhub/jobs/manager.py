"""JobManager: validates and queues fine-tune jobs, runs them in order, survives restarts.

Jobs start in submission order on one worker thread. A dedicated job runs on that thread;
a co-served one (see placement.py) trains inside the serving engine and is followed by a
thread of its own, so several share the engine while the worker goes on. Everything a job
needs to run again (its spec, inline data, checkpoints, MLflow run) is on disk before it is
reported, so a process that dies mid-job resumes it on the next ``start()``.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from adapterhub import settings
from adapterhub.finetune import FinetuneJob
from adapterhub.jobs.dataset import MAX_INLINE_RECORDS, InlineRecords, check_dataset, materialize
from adapterhub.jobs.errors import JobFinalError
from adapterhub.jobs.lock import StoreLock
from adapterhub.jobs.models import Job, JobState
from adapterhub.jobs.placement import CO_SERVE, DEDICATED, Coserving, resolve_placement
from adapterhub.jobs.progress import JobCancelled, JobPreempted
from adapterhub.jobs.runner import JobRunner
from adapterhub.jobs.store import JobStore, new_job_id
from adapterhub.jobs.validation import check_spec

log = logging.getLogger(__name__)

# An idle worker also re-reads the queue this often, so jobs another process inserted into
# the store are picked up; in-process submissions wake it at once.
IDLE_RECHECK_S = 5.0
# How often a watcher with a should_stop callback asks it (a blocked wait cannot see it).
WATCH_STOP_CHECK_S = 1.0


class JobManager:
    """The fine-tune job service behind the RPC layer; all public methods are thread-safe."""

    def __init__(
        self,
        store_path: str | Path,
        data_dir: str | Path | None,
        registry: Any = None,
        on_succeeded: Callable[[Job], None] | None = None,
        base_model: str | None = None,
        allowed_dataset_roots: Sequence[str | Path] | None = None,
        *,
        max_inline_records: int = MAX_INLINE_RECORDS,
        progress_interval: float = 0.2,
        coserving: Coserving | None = None,
        max_coserved: int = 4,
    ) -> None:
        self.data_dir = settings.data_dir(data_dir)
        self.store = JobStore(store_path)
        self.base_model = base_model
        self.allowed_dataset_roots = (None if allowed_dataset_roots is None
                                      else [Path(r) for r in allowed_dataset_roots])
        self.max_inline_records = max_inline_records
        self.on_succeeded = on_succeeded
        self._lock = StoreLock(store_path)
        self._wake = threading.Condition()
        self._kicked = False
        self._stopping = threading.Event()
        self._cancel_ids: set[str] = set()
        self._cancel_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.coserving = coserving  # None: every job runs on the dedicated worker
        self.max_coserved = max_coserved
        self._coserved: dict[str, threading.Thread] = {}  # job id -> its thread
        self._names: dict[str, str] = {}  # job id -> output name, of co-served jobs
        self._runner = JobRunner(
            self.store, self.data_dir, registry, progress_interval,
            cancelled=self._is_cancel_requested, stopping=self._stopping.is_set,
            before_success=self._succeeded,
        )

    # ---- submitting -------------------------------------------------------------------

    def submit(
        self,
        spec: FinetuneJob,
        train_records: InlineRecords | None = None,
        eval_records: InlineRecords | None = None,
    ) -> Job:
        """Validate ``spec`` and its data, then queue it; nothing is queued if a check fails.

        Raises ValueError or an AdapterHubError subclass (DatasetError, RegistryError,
        CheckpointError; DatasetNotAllowedError for a path outside the allowed roots), or
        PlacementUnavailableError for a job that must be co-served where it cannot be.
        """
        if isinstance(spec, FinetuneJob) and spec.base is None and self.base_model is not None:
            spec = replace(spec, base=self.base_model)
        spec = check_spec(spec)
        placement = resolve_placement(spec, self.coserving)
        plan = check_dataset(spec, train_records, eval_records, self.allowed_dataset_roots,
                             self.max_inline_records)
        job_id = new_job_id()
        data_dir = self.data_dir / "jobs-data" / job_id
        try:
            spec = materialize(plan, spec, data_dir)
            job = self.store.insert(spec, job_id, placement=placement)
        except BaseException:
            shutil.rmtree(data_dir, ignore_errors=True)
            raise
        with self._wake:
            self._kicked = True
            self._wake.notify_all()
        log.info("queued job %s (%s, %s)", job.id, spec.name, spec.method)
        return job

    # ---- reading ----------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        """The job, or JobNotFoundError (a KeyError) "job 'x' not found"."""
        return self.store.get(job_id)

    def list(self, states: Sequence[JobState | str] | None = None) -> list[Job]:
        """All jobs newest first; ``states`` keeps only those (None or empty = all)."""
        return self.store.list(states or None)

    def watch(
        self,
        job_id: str,
        timeout: float | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[Job]:
        """Yield the job now, then each time it changes, until it is final.

        Unknown ids raise here, not on the first ``next``. Changes that happen while the
        consumer is busy are coalesced into the latest state. The iterator also ends when
        ``timeout`` seconds pass or ``should_stop()`` turns true (checked about once a second,
        e.g. an RPC context's ``is_active`` negated), so an abandoned watch frees its thread.
        """
        first = self.store.get(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._watch(first, deadline, should_stop)

    def _watch(
        self, job: Job, deadline: float | None, should_stop: Callable[[], bool] | None
    ) -> Iterator[Job]:
        yield job
        while not job.is_final:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if should_stop is not None:
                wait = WATCH_STOP_CHECK_S if wait is None else min(wait, WATCH_STOP_CHECK_S)
            latest = self.store.wait_for_change(job.id, job.revision, wait)
            if latest.revision > job.revision:
                job = latest
                yield job
                continue
            if deadline is not None and time.monotonic() >= deadline:
                return
            if should_stop is not None and should_stop():
                return

    # ---- cancelling -------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: queued ones at once, a running one at its next step.

        Raises JobNotFoundError, or JobFinalError (a ValueError) "job is already <state>".
        """
        job = self.store.get(job_id)
        if job.state == JobState.QUEUED:
            cancelled = self.store.update(job_id, expect=[JobState.QUEUED],
                                          state=JobState.CANCELLED)
            if cancelled is not None:
                log.info("cancelled queued job %s", job_id)
                return cancelled
            job = self.store.get(job_id)  # the worker claimed it meanwhile
        if job.state == JobState.RUNNING:
            with self._cancel_lock:
                self._cancel_ids.add(job_id)
            # Persisted too, so a job running when the process dies is not resumed.
            flagged = self.store.update(job_id, expect=[JobState.RUNNING], cancel_requested=True)
            if flagged is not None:
                log.info("cancellation of running job %s requested", job_id)
                return flagged
            job = self.store.get(job_id)
        raise JobFinalError(f"job is already {job.state}")

    def _is_cancel_requested(self, job_id: str) -> bool:
        with self._cancel_lock:
            return job_id in self._cancel_ids

    # ---- the worker -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start the worker: jobs left running by a dead process first, then the queue.

        Raises StoreInUseError (a RuntimeError) when another manager runs this store.
        """
        if self.running:
            if self._stopping.is_set():
                raise RuntimeError("the job worker is still stopping (it ends at the running "
                                   "job's next step); wait for stop() to return True")
            return
        self._lock.acquire()
        self._stopping.clear()
        # Daemon: if the process exits without stop(), the job stays running and resumes later.
        self._thread = threading.Thread(target=self._work, name="adapterhub-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the worker; a running job is interrupted at its next step and left running, so
        the next ``start()`` resumes it from its checkpoint. Returns whether the worker ended
        within ``timeout`` (if not, it ends, and frees the store, at that step)."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return False
            self._thread = None
        return True

    def close(self, timeout: float | None = None) -> None:
        """Stop the worker and close the store."""
        if self.stop(timeout):
            self.store.close()

    def __enter__(self) -> JobManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _work(self) -> None:
        try:
            for job in self.store.list([JobState.RUNNING], oldest_first=True):
                if self._stopping.is_set():
                    return
                log.info("resuming job %s left running by a previous process", job.id)
                self._dispatch(job, resume=True)
            while not self._stopping.is_set():
                with self._wake:
                    self._kicked = False
                job = self.store.claim_next()
                if job is not None:
                    self._dispatch(job, resume=False)
                    continue
                with self._wake:
                    if not self._kicked and not self._stopping.is_set():
                        self._wake.wait(IDLE_RECHECK_S)
        except BaseException:
            # Like a process that dies: jobs stay as they were in the store and the next
            # start() picks them up again; a thread has nobody to re-raise to.
            log.exception("job worker stopped unexpectedly")
        finally:
            for thread in list(self._coserved.values()):
                thread.join()  # they end at their job's next step once stopping is set
            self._lock.release()

    def _succeeded(self, job: Job) -> None:
        if self.on_succeeded is not None:  # looked up late: callers may set it after __init__
            self.on_succeeded(job)

    def _interrupt(self, job_id: str) -> BaseException | None:
        if self._is_cancel_requested(job_id):
            return JobCancelled()
        return JobPreempted() if self._stopping.is_set() else None

    def _dispatch(self, job: Job, resume: bool) -> None:
        """Run a dedicated job here; start a co-served one on its own thread."""
        placement = job.placement or DEDICATED
        if placement == CO_SERVE and (self.coserving is None
                                      or self.coserving.unavailable(job.spec) is not None):
            # Restarted without co-serving: same data order and seed, so the same result.
            log.info("job %s was co-served; it continues on the dedicated worker", job.id)
            placement = DEDICATED
        if placement != job.placement:
            job = self.store.update(job.id, placement=placement) or job
        if placement == DEDICATED:
            self._execute(job, resume)
            return
        while not self._stopping.is_set():
            self._coserved = {k: t for k, t in self._coserved.items() if t.is_alive()}
            # Two jobs with one output name would share a checkpoint directory.
            same = [t for k, t in self._coserved.items() if self._names.get(k) == job.spec.name]
            if len(self._coserved) < self.max_coserved and not same:
                break
            (same or list(self._coserved.values()))[0].join(0.5)
        else:
            return  # stopping: the job stays running and resumes on the next start
        thread = threading.Thread(target=self._execute, args=(job, resume),
                                  name=f"adapterhub-coserve-{job.id}", daemon=True)
        self._coserved[job.id] = thread
        self._names[job.id] = job.spec.name
        thread.start()

    def _execute(self, job: Job, resume: bool) -> None:
        if job.cancel_requested or self._is_cancel_requested(job.id):
            self.store.update(job.id, state=JobState.CANCELLED)
        else:
            backend = None
            if job.placement == CO_SERVE and self.coserving is not None:
                backend = self.coserving.backend(job.spec, lambda: self._interrupt(job.id))
            # Calls on_succeeded before publishing.
            self._runner.run(job, resume=resume, backend=backend)
        self._names.pop(job.id, None)
        with self._cancel_lock:
            self._cancel_ids.discard(job.id)
