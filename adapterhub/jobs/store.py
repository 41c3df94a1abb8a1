"""SQLite persistence of fine-tune jobs (JSON columns, never pickle), safe across threads.

One connection is shared behind a lock: SQLite serialises writers anyway, and a single
connection lets every change notify in-process watchers through one condition variable.
"""

from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from adapterhub.finetune import FinetuneJob
from adapterhub.jobs.errors import JobNotFoundError
from adapterhub.jobs.models import Job, JobState

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL,
    loss REAL,
    tokens_per_s REAL,
    error TEXT,
    run_id TEXT,
    adapter_ref TEXT,
    metrics TEXT NOT NULL DEFAULT '{}',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    revision INTEGER NOT NULL DEFAULT 1,
    placement TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
"""

# Changes from schema version N-1 to N, applied in order to older stores.
_MIGRATIONS = {
    2: "ALTER TABLE jobs ADD COLUMN placement TEXT",  # where the job trains
}

# Columns a caller may change; id, spec, created_at and revision are the store's own.
UPDATABLE = frozenset({
    "state", "step", "total_steps", "loss", "tokens_per_s", "error", "run_id",
    "adapter_ref", "metrics", "cancel_requested", "placement",
})


def new_job_id() -> str:
    return f"job-{uuid.uuid4().hex[:12]}"


class JobStore:
    """Jobs in one SQLite file (WAL); every update bumps the job's revision and wakes waiters."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        # isolation_level=None: transactions are explicit, so a read never holds a write lock.
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                     timeout=30.0)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"job store {self.path} has schema version {version}; this AdapterHub "
                    f"reads up to {SCHEMA_VERSION}"
                )
            if version < SCHEMA_VERSION:
                self._upgrade()

    def _upgrade(self) -> None:
        # One write transaction, so two processes opening an old store migrate it once.
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            has_table = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone()
            if has_table:
                for target in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                    self._conn.execute(_MIGRATIONS[target])
            for statement in filter(str.strip, _SCHEMA.split(";")):
                self._conn.execute(statement)
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- writing ----------------------------------------------------------------------

    def insert(self, spec: FinetuneJob, job_id: str | None = None,
               placement: str | None = None) -> Job:
        """Persist a new queued job (in submission order) and return it."""
        now = time.time()
        job_id = job_id or new_job_id()
        with self._changed:
            self._conn.execute(
                "INSERT INTO jobs (id, spec, state, total_steps, created_at, updated_at,"
                " placement) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, json.dumps(spec.to_dict()), JobState.QUEUED.value, spec.train.steps,
                 now, now, placement),
            )
            job = self._get(job_id)
            self._changed.notify_all()
        return job

    def update(
        self, job_id: str, expect: Iterable[JobState] | None = None, **fields: Any
    ) -> Job | None:
        """Change fields of a job; with ``expect``, only if its state is one of those.

        Returns the updated job, or None when ``expect`` did not match (compare-and-set, so
        a cancel and the worker claiming the same job cannot both win).
        """
        unknown = set(fields) - UPDATABLE
        if unknown:
            raise ValueError(f"cannot update job field(s): {', '.join(sorted(unknown))}")
        values = {k: _to_column(k, v) for k, v in fields.items()}
        sets = "".join(f"{k} = ?, " for k in values)
        sql = f"UPDATE jobs SET {sets}revision = revision + 1, updated_at = ? WHERE id = ?"
        params: list[Any] = [*values.values(), time.time(), job_id]
        if expect is not None:
            states = [JobState(s).value for s in expect]
            sql += f" AND state IN ({', '.join('?' for _ in states)})"
            params.extend(states)
        with self._changed:
            changed = self._conn.execute(sql, params).rowcount
            if not changed:
                self._get(job_id)  # JobNotFoundError for an unknown id
                return None
            job = self._get(job_id)
            self._changed.notify_all()
        return job

    def claim_next(self) -> Job | None:
        """Atomically move the oldest queued job to running and return it (None if none)."""
        with self._changed:
            row = self._conn.execute(
                "SELECT id FROM jobs WHERE state = ? ORDER BY seq LIMIT 1",
                (JobState.QUEUED.value,),
            ).fetchone()
            if row is None:
                return None
            self._conn.execute(
                "UPDATE jobs SET state = ?, revision = revision + 1, updated_at = ? WHERE id = ?",
                (JobState.RUNNING.value, time.time(), row[0]),
            )
            job = self._get(row[0])
            self._changed.notify_all()
        return job

    # ---- reading ----------------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        with self._lock:
            return self._get(job_id)

    def list(self, states: Iterable[JobState | str] | None = None, oldest_first: bool = False
             ) -> list[Job]:
        """Jobs newest first (or in submission order), optionally only in some states."""
        order = "ASC" if oldest_first else "DESC"
        sql, params = f"SELECT {_SELECT} FROM jobs", []
        if states is not None:
            wanted = [JobState(s).value for s in states]
            if not wanted:
                return []
            sql += f" WHERE state IN ({', '.join('?' for _ in wanted)})"
            params = wanted
        with self._lock:
            rows = self._conn.execute(f"{sql} ORDER BY seq {order}", params).fetchall()
        return [_from_row(r) for r in rows]

    def wait_for_change(self, job_id: str, revision: int, timeout: float | None) -> Job:
        """Block until the job's revision exceeds ``revision`` or ``timeout`` passes.

        Returns the job as it is then (the caller compares revisions to tell which).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                job = self._get(job_id)
                if job.revision > revision:
                    return job
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return job
                self._changed.wait(remaining)

    def _get(self, job_id: str) -> Job:
        row = self._conn.execute(f"SELECT {_SELECT} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"job {job_id!r} not found")
        return _from_row(row)


_COLUMNS = ("seq", "id", "spec", "state", "step", "total_steps", "loss", "tokens_per_s",
            "error", "run_id", "adapter_ref", "metrics", "cancel_requested", "created_at",
            "updated_at", "revision", "placement")
_SELECT = ", ".join(_COLUMNS)


def _to_column(name: str, value: Any) -> Any:
    if name == "metrics":
        return json.dumps({str(k): float(v) for k, v in (value or {}).items()})
    if name == "state":
        return JobState(value).value
    if name == "cancel_requested":
        return int(bool(value))
    if name in ("loss", "tokens_per_s") and value is not None:
        value = float(value)
        return value if math.isfinite(value) else None  # SQLite has no NaN
    return value


def _from_row(row: tuple) -> Job:
    d = dict(zip(_COLUMNS, row, strict=True))
    return Job(
        id=d["id"],
        spec=FinetuneJob.from_dict(json.loads(d["spec"])),
        state=JobState(d["state"]),
        total_steps=d["total_steps"],
        step=d["step"],
        loss=d["loss"],
        tokens_per_s=d["tokens_per_s"],
        error=d["error"],
        run_id=d["run_id"],
        adapter_ref=d["adapter_ref"],
        metrics=json.loads(d["metrics"]),
        cancel_requested=bool(d["cancel_requested"]),
        created_at=d["created_at"],
        updated_at=d["updated_at"],
        revision=d["revision"],
        placement=d["placement"],
    )
