"""The MLflow registry of a replica: opened once, off the request path, one at a time.

Importing MLflow and opening the store take seconds, so a replica starts opening it in the
background and the first user waits for it; replicas opening one new SQLite store at the
same moment would race creating its tables, so they take turns on a file lock.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from serving.cluster.placement import FileLock


class LazyRegistry:
    """The MLflow registry, opened once, off the request path: the replica starts opening it
    in the background (importing MLflow takes seconds) and the first user waits for it."""

    def __init__(self, data_dir: Any, tracking_uri: str) -> None:
        self._args = (data_dir, tracking_uri)
        self._registry: Any = None
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._registry is not None

    def open(self) -> Any:
        with self._lock:
            if self._registry is None:
                self._registry = self._open()
            return self._registry

    def __getattr__(self, name: str) -> Any:
        return getattr(self.open(), name)

    def _open(self) -> Any:
        from adapterhub.registry import Registry

        data_dir, uri = self._args
        if not uri.startswith("sqlite:"):
            return Registry(data_dir, uri)
        # Replicas that open one new SQLite store at once race creating its tables
        # ("table metrics already exists"): one at a time, across processes.
        lock = FileLock(Path(data_dir) / ".registry-open.lock")
        lock.acquire()
        try:
            return Registry(data_dir, uri)
        finally:
            lock.release()
