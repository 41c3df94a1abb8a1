"""JobStore and the store lock, without training: persistence, revisions, claims, waits."""

from __future__ import annotations

import threading
import time

import pytest

from adapterhub.jobs import JobManager, JobNotFoundError, JobState, JobStore, StoreInUseError
from adapterhub.jobs.lock import StoreLock
from tests.test_jobs_support import spec


def test_jobs_persist_in_submission_order_with_revisions(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    a = store.insert(spec("a"))
    b = store.insert(spec("b", steps=7))
    assert a.id.startswith("job-") and len(a.id) == 16 and a.id != b.id
    assert (a.state, a.revision, b.total_steps) == (JobState.QUEUED, 1, 7)
    assert [j.id for j in store.list()] == [b.id, a.id]  # newest first

    updated = store.update(a.id, step=2, loss=1.5, metrics={"exact_match": 0.5})
    assert updated.revision == 2 and updated.loss == 1.5 and updated.metrics["exact_match"] == 0.5
    assert store.update(a.id, expect=[JobState.RUNNING], state=JobState.FAILED) is None
    assert store.claim_next().id == a.id  # oldest queued first
    assert store.claim_next().id == b.id and store.claim_next() is None
    store.close()

    reopened = JobStore(tmp_path / "jobs.db")  # everything, including the spec, survives
    job = reopened.get(a.id)
    assert job.state == JobState.RUNNING and job.step == 2 and job.revision == 3
    assert job.spec.to_dict() == spec("a").to_dict()
    assert [j.id for j in reopened.list([JobState.RUNNING], oldest_first=True)] == [a.id, b.id]
    assert reopened.list([]) == []
    with pytest.raises(JobNotFoundError, match="^job 'nope' not found$"):
        reopened.get("nope")
    with pytest.raises(JobNotFoundError):
        reopened.update("nope", step=1)
    with pytest.raises(ValueError, match="revision"):
        reopened.update(a.id, revision=9)


def test_nan_loss_is_stored_as_unknown(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job = store.insert(spec("a"))
    assert store.update(job.id, loss=float("nan")).loss is None


def test_wait_for_change_wakes_on_update_and_times_out(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job = store.insert(spec("a"))
    t0 = time.monotonic()
    assert store.wait_for_change(job.id, job.revision, timeout=0.1).revision == job.revision
    assert time.monotonic() - t0 >= 0.1
    timer = threading.Timer(0.1, lambda: store.update(job.id, step=1))
    timer.start()
    changed = store.wait_for_change(job.id, job.revision, timeout=10)
    assert changed.step == 1 and changed.revision == job.revision + 1
    timer.join()


def test_concurrent_updates_are_all_counted(tmp_path):
    store = JobStore(tmp_path / "jobs.db")
    job = store.insert(spec("a"))

    def bump():
        for _ in range(50):
            store.update(job.id, step=1)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get(job.id).revision == 1 + 200


def test_store_lock_is_exclusive_and_released(tmp_path):
    first, second = StoreLock(tmp_path / "jobs.db"), StoreLock(tmp_path / "jobs.db")
    first.acquire()
    with pytest.raises(StoreInUseError, match="already run by another JobManager"):
        second.acquire()
    first.release()
    second.acquire()
    second.release()


def test_second_manager_on_the_same_store_refuses_to_start(tmp_path):
    store = tmp_path / "jobs.db"
    one = JobManager(store, tmp_path / "data")
    two = JobManager(store, tmp_path / "data")
    one.start()
    try:
        with pytest.raises(RuntimeError, match=r"jobs\.db is already run by another JobManager"):
            two.start()
        assert not two.running
    finally:
        assert one.stop(timeout=10)
    two.start()  # free once the first one stopped
    assert two.running
    assert two.stop(timeout=10)
