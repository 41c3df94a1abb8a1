"""The fine-tune job service: a persistent queue of jobs run one at a time, resumable.

``JobManager`` validates and queues jobs and runs them on a worker thread; ``JobStore`` keeps
them in SQLite; ``Job`` and ``JobState`` are what callers read back.
"""

from adapterhub.jobs.errors import (
    DatasetNotAllowedError,
    JobFinalError,
    JobNotFoundError,
    PlacementUnavailableError,
    StoreInUseError,
)
from adapterhub.jobs.manager import JobManager
from adapterhub.jobs.models import Job, JobState
from adapterhub.jobs.store import JobStore

__all__ = [
    "DatasetNotAllowedError",
    "Job",
    "JobFinalError",
    "JobManager",
    "JobNotFoundError",
    "JobState",
    "JobStore",
    "PlacementUnavailableError",
    "StoreInUseError",
]
