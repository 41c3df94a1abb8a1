"""Restart safety: a job interrupted by a crash, or by stop(), resumes in a new manager from
its checkpoint, in the same MLflow run, and is registered once."""

from __future__ import annotations

import time

from mlflow.tracking import MlflowClient

from adapterhub.jobs import JobManager, JobState
from adapterhub.jobs.progress import ProgressRecorder
from adapterhub.registry import Registry
from adapterhub.train.state import latest_checkpoint
from tests.test_jobs_support import records, spec


class SimulatedCrash(BaseException):
    """Unwinds the worker thread the way the death of the process would stop it."""


def _latest_checkpoint_step(data_dir, name: str) -> int:
    return int(latest_checkpoint(data_dir / "jobs" / name).name.split("-")[1])


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_interrupted_job_resumes_in_a_new_manager(tiny_llama, tmp_path, monkeypatch):
    store, data = tmp_path / "jobs.db", tmp_path / "data"
    job_spec = spec("survivor", steps=10, eval_base=True, train={"checkpoint_every": 2})

    def manager() -> JobManager:
        return JobManager(store, data, base_model=str(tiny_llama), progress_interval=0.0)

    # 1. The process "dies" during step 5: the job stays running, checkpoint 4 is on disk.
    real_call = ProgressRecorder.__call__

    def crash_at_five(self, metrics, step):
        real_call(self, metrics, step)
        if step == 5:
            raise SimulatedCrash

    monkeypatch.setattr(ProgressRecorder, "__call__", crash_at_five)
    first = manager()
    job = first.submit(job_spec, records(20))
    first.start()
    _wait(lambda: not first.running)
    monkeypatch.setattr(ProgressRecorder, "__call__", real_call)
    crashed = first.get(job.id)
    assert crashed.state == JobState.RUNNING and crashed.step == 5 and crashed.run_id
    assert _latest_checkpoint_step(data, "survivor") == 4

    # 2. A new manager resumes it from step 4; stop() then interrupts it again (a shutdown).
    second = manager()
    second.start()
    resumed = []
    for seen in second.watch(job.id, timeout=120):
        resumed.append(seen)
        if seen.step >= 6:
            assert second.stop(timeout=60)
            break
    stopped = second.get(job.id)
    assert stopped.state == JobState.RUNNING and not second.running
    assert min(j.step for j in resumed[1:]) == 5  # never below checkpoint 4
    checkpoint = _latest_checkpoint_step(data, "survivor")
    assert checkpoint >= 4

    # 3. A third manager finishes it: same run, version 1, nothing lost.
    third = manager()
    third.start()
    try:
        final_watch = list(third.watch(job.id, timeout=120))
    finally:
        assert third.stop(timeout=30)
    done = final_watch[-1]
    assert done.state == JobState.SUCCEEDED, done.error
    assert min(j.step for j in final_watch[1:]) == checkpoint + 1
    assert done.run_id == crashed.run_id and done.adapter_ref == "survivor/1"
    assert "base_exact_match" in done.metrics and "exact_match" in done.metrics
    registry = Registry(data)
    version = registry.resolve_version("survivor")
    assert version.version == 1 and version.run_id == crashed.run_id
    client = MlflowClient(registry.tracking_uri)
    assert client.get_run(done.run_id).info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(done.run_id, "loss")}
    assert steps == set(range(1, 11))
    assert len(third.list()) == 1
