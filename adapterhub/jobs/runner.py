"""Running one queued or recovered job through run_finetune and recording how it ended."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterHubError
from adapterhub.finetune import run_finetune, same_job
from adapterhub.jobs.models import Job, JobState
from adapterhub.jobs.progress import JobCancelled, JobPreempted, ProgressRecorder
from adapterhub.jobs.store import JobStore

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 1000


def finetune_state_file(data_dir: Path, name: str) -> Path:
    """Where run_finetune keeps the state of the job named ``name`` (its resume record)."""
    return data_dir / "jobs" / name / "job.json"


def one_line(exc: BaseException) -> str:
    """A single-line message: ours are already user-facing; others get their type name."""
    text = str(exc) if isinstance(exc, AdapterHubError | ValueError) else \
        f"{type(exc).__name__}: {exc}"
    text = " ".join(text.split()) or type(exc).__name__
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


class JobRunner:
    """Executes jobs for a manager: its worker and the threads of co-served jobs."""

    def __init__(
        self,
        store: JobStore,
        data_dir: Path,
        registry: Any,
        progress_interval: float,
        cancelled: Callable[[str], bool],
        stopping: Callable[[], bool],
        before_success: Callable[[Job], None] | None = None,
    ) -> None:
        self.before_success = before_success
        self.store = store
        self.data_dir = data_dir
        self._registry = registry
        self._registry_lock = threading.Lock()
        self.progress_interval = progress_interval
        self._cancelled = cancelled
        self._stopping = stopping

    @property
    def registry(self) -> Any:
        # Created on first use: importing MLflow takes seconds and only the worker needs it.
        with self._registry_lock:  # co-served jobs' threads may ask at the same time
            if self._registry is None:
                from adapterhub.registry import Registry

                self._registry = Registry(self.data_dir)
            return self._registry

    def run(self, job: Job, resume: bool, backend: Any = None) -> Job:
        """Run ``job`` (already marked running) to a final state, or leave it running if the
        manager stops; never raises for the job's own failures.

        ``resume`` is set only for jobs found running at start-up: a fresh job must not pick
        up checkpoints or the MLflow run of an earlier job that had the same name and spec.
        ``backend`` is where it trains (None: a dedicated copy of the base model, here).
        """
        state_file = finetune_state_file(self.data_dir, job.spec.name)
        if resume:
            adopted = self._adopt_finished(job, state_file)
            if adopted is not None:
                return adopted
        recorder = ProgressRecorder(
            self.store, job, state_file, self.progress_interval,
            cancelled=lambda: self._cancelled(job.id), stopping=self._stopping,
        )
        try:
            result = run_finetune(job.spec, self.data_dir, registry=self.registry,
                                  progress=False, resume=resume, on_step=recorder,
                                  backend=backend)
        except JobCancelled:
            self._mark_killed(recorder.run_id)
            log.info("job %s cancelled at step %s", job.id, recorder.job.step)
            return recorder.flush(state=JobState.CANCELLED)
        except JobPreempted:
            log.info("job %s interrupted at step %s; it resumes on the next start",
                     job.id, recorder.job.step)
            return recorder.flush()
        except Exception as exc:
            log.exception("job %s (%s) failed", job.id, job.spec.name)
            return recorder.flush(state=JobState.FAILED, error=one_line(exc))
        metrics = {**result.metrics, **{f"base_{k}": v for k, v in result.base_metrics.items()}}
        if job.spec.eval_base and not result.base_metrics:
            # A resumed run evaluated the base before the interruption; its metrics are in MLflow.
            metrics.update(self._run_metrics(result.run_id, prefix="base_"))
        last = result.metrics
        adapter_ref = f"{result.name}/{result.version}"
        self._announce(replace(recorder.job, state=JobState.SUCCEEDED, run_id=result.run_id,
                               adapter_ref=adapter_ref, metrics=metrics))
        return recorder.flush(
            state=JobState.SUCCEEDED, step=job.total_steps, run_id=result.run_id,
            adapter_ref=adapter_ref, metrics=metrics,
            **{k: last[k] for k in ("loss", "tokens_per_s") if k in last},
        )

    def _adopt_finished(self, job: Job, state_file: Path) -> Job | None:
        """A job that finished and registered before the process died is not trained again."""
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            return None
        if not (state.get("status") == "finished" and job.run_id
                and state.get("run_id") == job.run_id and same_job(state.get("job"), job.spec)):
            return None
        log.info("job %s had already finished as version %s; recording it", job.id,
                 state.get("version"))
        adapter_ref = f"{job.spec.name}/{state['version']}"
        metrics = self._run_metrics(job.run_id)
        self._announce(replace(job, state=JobState.SUCCEEDED, adapter_ref=adapter_ref,
                               metrics=metrics))
        return self.store.update(
            job.id, state=JobState.SUCCEEDED, step=job.total_steps,
            adapter_ref=adapter_ref, metrics=metrics,
        )

    def _announce(self, done: Job) -> None:
        # Whoever serves the adapter loads it before watchers see SUCCEEDED, so a client
        # that reacts to the final state finds the adapter already there.
        if self.before_success is None:
            return
        try:
            self.before_success(done)
        except Exception:
            log.exception("on_succeeded hook failed for job %s", done.id)

    def _run_metrics(self, run_id: str, prefix: str = "") -> dict[str, float]:
        try:
            metrics = self.registry.client.get_run(run_id).data.metrics
        except Exception:  # metrics are a convenience; the adapter is registered regardless
            log.warning("cannot read metrics of run %s", run_id, exc_info=True)
            return {}
        return {k: float(v) for k, v in metrics.items() if k.startswith(prefix)}

    def _mark_killed(self, run_id: str | None) -> None:
        # The run ended FAILED when the cancellation unwound it; KILLED says what happened.
        if run_id is None:
            return
        try:
            self.registry.client.set_terminated(run_id, status="KILLED")
        except Exception:
            log.warning("cannot mark run %s killed", run_id, exc_info=True)
