"""Which fine-tune job a replica takes next, without a coordinator: locks in the shared store.

Replicas pull work from the shared job store. A replica that runs a job holds an exclusive
``flock`` on that job's lock file; the kernel drops it when the process dies, however it
dies. So a job that is RUNNING in the store while nobody holds its lock has lost its
replica, and the next replica that looks resumes it from its checkpoint. Queued jobs are
claimed with the store's compare-and-set (QUEUED -> RUNNING), after taking the lock, so no
other replica can mistake a job being claimed for an orphan.

Replicas also hold a shared lock on the store's own lock file: an embedded server's
JobManager (which takes it exclusively) cannot run the same queue beside a cluster.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from adapterhub.jobs.models import Job, JobState
from adapterhub.jobs.store import JobStore

SCAN_QUEUED = 8  # queued jobs looked at per round (locks held elsewhere are skipped)


class FileLock:
    """A non-blocking flock on one file, exclusive or shared."""

    def __init__(self, path: Path, shared: bool = False) -> None:
        self.path = path
        self.shared = shared
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self) -> None:
        """Block until the lock is ours."""
        if self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
            self._fd = fd

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self, unlink: bool = False) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if unlink:
            # Safe: whoever opens the old file next re-reads the job, which is final by then.
            self.path.unlink(missing_ok=True)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class Claim:
    """A job this replica runs; ``resume`` when another replica had started it."""

    def __init__(self, job: Job, resume: bool, lock: FileLock, name_lock: FileLock) -> None:
        self.job = job
        self.resume = resume
        self.lock = lock
        self.name_lock = name_lock

    def release(self, final: bool) -> None:
        self.name_lock.release()
        self.lock.release(unlink=final)


class Placement:
    def __init__(self, store: JobStore, store_path: Path) -> None:
        self.store = store
        self.lock_dir = Path(f"{store_path}.locks")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self.store_lock = FileLock(Path(f"{store_path}.lock"), shared=True)

    def _locks(self, job: Job) -> tuple[FileLock, FileLock] | None:
        """The job's lock and its output name's: two jobs writing one name would share a
        checkpoint directory, so a name runs on one replica at a time."""
        lock = FileLock(self.lock_dir / f"{job.id}.lock")
        if not lock.try_acquire():
            return None
        name_lock = FileLock(self.lock_dir / f"name-{job.spec.name}.lock")
        if not name_lock.try_acquire():
            lock.release()
            return None
        return lock, name_lock

    def next_job(self) -> Claim | None:
        """An orphaned running job (oldest first), else the oldest queued one, else None."""
        if not self.store_lock.try_acquire():
            return None  # an embedded JobManager runs this store; stay out of its way
        for job in self.store.list([JobState.RUNNING], oldest_first=True):
            locks = self._locks(job)
            if locks is None:
                continue  # its replica is alive and running it
            fresh = self.store.get(job.id)
            if fresh.state is JobState.RUNNING:
                return Claim(fresh, True, *locks)
            locks[1].release()  # it finished between the listing and the locks
            locks[0].release()
        for job in self.store.list([JobState.QUEUED], oldest_first=True)[:SCAN_QUEUED]:
            locks = self._locks(job)
            if locks is None:
                continue
            claimed = self.store.update(job.id, expect=[JobState.QUEUED], state=JobState.RUNNING)
            if claimed is not None:
                return Claim(claimed, False, *locks)
            locks[1].release()  # cancelled or claimed meanwhile
            locks[0].release()
        return None

    def close(self) -> None:
        self.store_lock.release()
