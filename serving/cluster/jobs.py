"""Fine-tune jobs in cluster mode: the API side queues them, replicas run them.

The API process keeps the FineTuneService contract with a JobManager whose worker never
starts (ClusterJobManager): submit validates, resolves the placement and persists;
get/list/watch/cancel read and write the shared store. Each replica runs a JobWorker that
takes jobs from that store (see placement.py) and runs them with the same JobRunner as the
embedded server, co-served inside the replica's engine or on a dedicated copy of the base
model, as the job's placement says. Progress, checkpoints, MLflow run and registration are
identical, and a job whose replica dies is resumed from its checkpoint by another replica,
in the same MLflow run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from adapterhub.jobs.manager import JobManager
from adapterhub.jobs.models import Job, JobState
from adapterhub.jobs.placement import CO_SERVE, DEDICATED
from adapterhub.jobs.progress import JobCancelled, JobPreempted
from adapterhub.jobs.runner import JobRunner
from adapterhub.jobs.store import JobStore
from serving.cluster.placement import Claim, Placement

log = logging.getLogger("adapterhub.cluster")


class ReplicasCoserving:
    """The API side's view of co-serving: which jobs the replicas' engines can train (their
    model is the application's base model). Training itself happens on a replica."""

    def __init__(self, model: str) -> None:
        self._engine = SimpleNamespace(config=SimpleNamespace(model=model))

    def unavailable(self, spec: Any) -> str | None:
        from serving.engine.coserve.job import coservable

        return coservable(spec, self._engine)

    def backend(self, spec: Any, interrupt: Callable[[], BaseException | None]) -> Any:
        raise RuntimeError("co-served jobs train on a replica, not in the API process")


class ClusterJobManager(JobManager):
    """JobManager for the API process: the queue is shared, the replicas run it."""

    def start(self) -> None:
        # Replicas hold the store's lock (shared) and run the jobs; this process only
        # queues, reads and cancels, which the store allows from any process.
        return None

    @property
    def running(self) -> bool:
        return False


class JobWorker:
    """Per replica: take jobs (orphans first) while fewer than ``max_jobs`` run here."""

    def __init__(self, store_path: Path, data_dir: Path, registry: Any, replica: str,
                 on_succeeded: Callable[[Job], None] | None = None, poll_s: float = 1.0,
                 max_jobs: int = 1, coserving: Any = None, progress_interval: float = 0.2
                 ) -> None:
        self.replica = replica
        self.poll_s = poll_s
        self.max_jobs = max(1, int(max_jobs))
        self.coserving = coserving  # EngineCoserving of this replica's engine, or None
        self.store = JobStore(store_path)
        self.placement = Placement(self.store, store_path)
        self._stop = threading.Event()
        self._running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._runner = JobRunner(self.store, data_dir, registry, progress_interval,
                                 cancelled=self._cancel_requested, stopping=self._stop.is_set,
                                 before_success=on_succeeded)
        self._thread = threading.Thread(target=self._work, name="cluster-jobs", daemon=True)

    def start(self) -> JobWorker:
        self._thread.start()
        return self

    def running_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._running)

    def _cancel_requested(self, job_id: str) -> bool:
        # The API process persists the request; read it here (once per progress report).
        try:
            return self.store.get(job_id).cancel_requested
        except KeyError:
            return True  # deleted under us: stop

    def _interrupt(self, job_id: str) -> BaseException | None:
        if self._cancel_requested(job_id):
            return JobCancelled()
        return JobPreempted() if self._stop.is_set() else None

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._running = {k: t for k, t in self._running.items() if t.is_alive()}
                full = len(self._running) >= self.max_jobs
            claim = None
            if not full:
                try:
                    claim = self.placement.next_job()
                except Exception:  # noqa: BLE001 - a busy or absent store: look again later
                    log.warning("replica %s cannot read the job store", self.replica,
                                exc_info=True)
            if claim is None:
                self._stop.wait(self.poll_s)
                continue
            thread = threading.Thread(target=self._run, args=(claim,), daemon=True,
                                      name=f"cluster-job-{claim.job.id}")
            with self._lock:
                self._running[claim.job.id] = thread
            thread.start()

    def _placement(self, job: Job) -> str:
        placement = job.placement or DEDICATED
        if placement == CO_SERVE and (self.coserving is None
                                      or self.coserving.unavailable(job.spec) is not None):
            placement = DEDICATED  # this replica's engine cannot: same data, same result
        return placement

    def _run(self, claim: Claim) -> None:
        job, final = claim.job, False
        try:
            placement = self._placement(job)
            if placement != job.placement:
                job = self.store.update(job.id, placement=placement) or job
            log.info("replica %s %s job %s (%s, %s)", self.replica,
                     "resumes" if claim.resume else "runs", job.id, job.spec.name, placement)
            if job.cancel_requested:
                done = self.store.update(job.id, state=JobState.CANCELLED)
            else:
                backend = None
                if placement == CO_SERVE:
                    backend = self.coserving.backend(job.spec,
                                                     lambda: self._interrupt(job.id))
                done = self._runner.run(job, resume=claim.resume, backend=backend)
            final = done is not None and done.is_final
        except Exception:  # noqa: BLE001 - like a crash: the job stays running, resumable
            log.exception("replica %s: job %s stopped unexpectedly", self.replica, job.id)
        finally:
            claim.release(final=final)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop at the running jobs' next steps; they stay RUNNING and another replica (or
        this one's replacement) resumes them once this process lets go of their locks."""
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            threads = list(self._running.values())
        for thread in threads:
            thread.join(timeout)
        alive = self._thread.is_alive() or any(t.is_alive() for t in threads)
        if not alive:
            self.placement.close()
            self.store.close()
        return not alive
