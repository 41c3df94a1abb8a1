"""An exclusive, process-wide lock on a job store, so two managers never run the same queue."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from adapterhub.jobs.errors import StoreInUseError


class StoreLock:
    """``flock`` on ``<store>.lock``; the kernel drops it if the holder dies, so none go stale."""

    def __init__(self, store_path: str | Path) -> None:
        self.store_path = Path(store_path)
        self.path = Path(f"{store_path}.lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise StoreInUseError naming the holder's pid."""
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreInUseError(
                f"job store {self.store_path} is already run by another JobManager "
                f"(pid {holder} holds {self.path}); stop it before starting this one"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
