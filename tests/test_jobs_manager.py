"""JobManager end to end on a tiny checkpoint: runs, order, registration, watch, cancel."""

from __future__ import annotations

import threading
import time

import pytest

from adapterhub.jobs import JobFinalError, JobManager, JobNotFoundError, JobState
from adapterhub.registry import Registry
from tests.test_jobs_support import records, spec, write_jsonl


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # One MLflow database for the module: creating one costs seconds; names keep tests apart.
    return tmp_path_factory.mktemp("jobs-data")


def _wait(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_jobs_run_in_order_register_and_report(tiny_llama, tmp_path, data_dir):
    seen: list = []
    manager = JobManager(tmp_path / "jobs.db", data_dir, base_model=str(tiny_llama),
                         allowed_dataset_roots=[tmp_path], progress_interval=0.0)

    def on_succeeded(job):
        # Called before SUCCEEDED is published (a watcher that sees it finds the adapter
        # served already) and before the worker takes the next job.
        seen.append((job.id, [j.state for j in manager.list()]))

    manager.on_succeeded = on_succeeded
    first = manager.submit(spec("inline", steps=4, eval_base=True), records(20))
    second = manager.submit(spec("inline", train_file=str(write_jsonl(tmp_path / "t.jsonl")),
                                 aliases=["prod"]))
    manager.start()
    try:
        watched = list(manager.watch(first.id, timeout=120))
        done = list(manager.watch(second.id, timeout=120))[-1]
    finally:
        assert manager.stop(timeout=30)

    assert watched[0].state in (JobState.QUEUED, JobState.RUNNING)
    assert watched[-1].state == JobState.SUCCEEDED and watched[-1].is_final
    revisions = [j.revision for j in watched]
    assert revisions == sorted(set(revisions))
    steps = [j.step for j in watched]
    assert steps == sorted(steps) and {1, 4} <= set(steps)
    assert any(j.state == JobState.RUNNING and j.run_id for j in watched)  # visible while running

    job = manager.get(first.id)
    assert job.adapter_ref == "inline/1" and job.step == job.total_steps == 4
    assert job.run_id and job.error is None and job.loss is not None
    for key in ("loss", "exact_match", "eval_loss", "base_exact_match", "adapter_bytes"):
        assert key in job.metrics, key
    assert done.state == JobState.SUCCEEDED and done.adapter_ref == "inline/2"

    assert [s[0] for s in seen] == [first.id, second.id]
    assert seen[0][1] == [JobState.QUEUED, JobState.RUNNING]  # newest first
    registry = Registry(data_dir)
    assert registry.resolve("inline/1").is_dir()
    assert registry.resolve_version("inline@prod").version == 2
    assert registry.resolve_version("inline/1").run_id == job.run_id
    assert [j.id for j in manager.list([JobState.SUCCEEDED])] == [second.id, first.id]


def test_cancel_queued_and_running_jobs(tiny_llama, tmp_path, data_dir):
    manager = JobManager(tmp_path / "jobs.db", data_dir, base_model=str(tiny_llama),
                         allowed_dataset_roots=[tmp_path])
    long_spec = spec("long", steps=500, train_file=str(write_jsonl(tmp_path / "t.jsonl")))
    long = manager.submit(long_spec)
    queued = manager.submit(spec("never"), records())
    assert manager.cancel(queued.id).state == JobState.CANCELLED  # at once, not started
    manager.start()
    try:
        _wait(lambda: manager.get(long.id).step >= 1)
        flagged = manager.cancel(long.id)
        assert flagged.state == JobState.RUNNING and flagged.cancel_requested
        t0 = time.monotonic()
        final = list(manager.watch(long.id, timeout=60))[-1]
        assert time.monotonic() - t0 < 10
        # The same spec again is a new job: it must not resume the cancelled one's checkpoint
        # or MLflow run.
        again = manager.submit(long_spec)
        steps = []
        for seen in manager.watch(again.id, timeout=60):
            steps.append(seen.step)
            if seen.step >= 1 and seen.run_id:
                manager.cancel(again.id)
                break
        assert 1 in steps and seen.run_id != final.run_id
        assert list(manager.watch(again.id, timeout=60))[-1].state == JobState.CANCELLED
    finally:
        assert manager.stop(timeout=30)
    assert final.state == JobState.CANCELLED and final.step < 500
    assert final.error is None and final.adapter_ref is None
    with pytest.raises(JobFinalError, match="^job is already cancelled$"):
        manager.cancel(long.id)
    with pytest.raises(JobNotFoundError, match="job 'job-0' not found"):
        manager.cancel("job-0")
    with pytest.raises(KeyError):
        manager.watch("job-0")
    from mlflow.tracking import MlflowClient

    run = MlflowClient(Registry(data_dir).tracking_uri).get_run(final.run_id)
    assert run.info.status == "KILLED"
    assert manager.get(queued.id).state == JobState.CANCELLED


def test_failed_job_reports_one_line_and_the_queue_goes_on(tiny_llama, tmp_path, data_dir):
    train = write_jsonl(tmp_path / "t.jsonl")
    manager = JobManager(tmp_path / "jobs.db", data_dir, base_model=str(tiny_llama))
    broken = manager.submit(spec("broken", train_file=str(train)))
    after = manager.submit(spec("after"), records())
    train.write_text("not json\n")  # changed after submission: the run itself fails
    manager.start()
    try:
        last = list(manager.watch(after.id, timeout=120))[-1]
    finally:
        assert manager.stop(timeout=30)
    failed = manager.get(broken.id)
    assert failed.state == JobState.FAILED
    assert failed.error == f"{train}:1: invalid JSON (Expecting value)"
    assert last.state == JobState.SUCCEEDED


def test_watch_ends_on_timeout_and_on_should_stop(tmp_path):
    manager = JobManager(tmp_path / "jobs.db", tmp_path / "data")  # never started
    job = manager.store.insert(spec("idle"))
    t0 = time.monotonic()
    assert [j.id for j in manager.watch(job.id, timeout=0.2)] == [job.id]
    assert 0.2 <= time.monotonic() - t0 < 5
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    t0 = time.monotonic()
    assert len(list(manager.watch(job.id, should_stop=stop.is_set))) == 1
    assert time.monotonic() - t0 < 5
