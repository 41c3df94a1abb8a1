"""The directory: which replica holds what, and the adapter names loaded cluster-wide.

One small Serve deployment. Every replica reports a snapshot (resident and registered
adapters, engine load, running jobs) about twice a second; a replica that stops reporting
drops out after ``ttl_s``, so a killed replica disappears from the view by itself.

Adapters loaded through the API (AdapterService.Load, a finished fine-tune job) get a
cluster-wide name -> source entry in a versioned table that replicas pull with their
reports: a replica that serves the name later loads the same source, a replaced source is
reloaded where the name is held, and an unloaded name (a tombstone) is dropped everywhere.
The table lives in the replicas too; a restarted directory adopts the newest copy from
their reports, so it needs no storage of its own.
"""

from __future__ import annotations

import threading
import time
from typing import Any

TOMBSTONE_TTL_S = 600.0  # an unloaded name is remembered this long, for replicas that lag


class ReplicaDirectory:
    def __init__(self, ttl_s: float = 3.0) -> None:
        self.ttl_s = ttl_s
        self._replicas: dict[str, dict[str, Any]] = {}
        self._names: dict[str, dict[str, Any]] = {}  # name -> {source, info, version[, gone]}
        self._version = 0
        # Serve may call sync methods from a thread pool: one change or read at a time.
        self._lock = threading.RLock()

    # -- replicas -------------------------------------------------------------------------
    def report(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        """Record a replica's snapshot; answer with the name table when it is behind."""
        with self._lock:
            snapshot["seen_at"] = time.time()
            self._replicas[snapshot["replica"]] = snapshot
            theirs = int(snapshot.get("names_version", 0))
            if theirs > self._version and "names" in snapshot:
                # This directory restarted: the replicas' copy is the newest table there is.
                self._names, self._version = dict(snapshot["names"]), theirs
            reply: dict[str, Any] = {"version": self._version}
            if theirs < self._version:
                reply["names"] = dict(self._names)
            elif theirs > self._version:
                reply["send_names"] = True
            return reply

    def forget(self, replica: str) -> None:
        """A replica that shuts down cleanly leaves at once instead of timing out."""
        with self._lock:
            self._replicas.pop(replica, None)

    def _live(self) -> dict[str, dict[str, Any]]:
        cutoff = time.time() - self.ttl_s
        for rid in [r for r, s in self._replicas.items() if s["seen_at"] < cutoff]:
            del self._replicas[rid]
        return self._replicas

    # -- names ----------------------------------------------------------------------------
    def set_name(self, name: str, source: str, info: dict[str, Any] | None = None) -> int:
        return self.set_names({name: (source, info)})

    def set_names(self, entries: dict[str, tuple[str, dict[str, Any] | None]]) -> int:
        """Publish name -> (source, info) entries under one new table version."""
        with self._lock:
            self._version += 1
            for name, (source, info) in entries.items():
                self._names[name] = {"source": source, "info": info or {}, "version": self._version}
            return self._version

    def drop_name(self, name: str) -> int:
        return self.drop_names([name])

    def drop_names(self, names: list[str]) -> int:
        """Unload names everywhere (tombstones under one new table version)."""
        with self._lock:
            self._version += 1
            now = time.time()
            for name in names:
                self._names[name] = {"gone": True, "version": self._version, "at": now}
            cutoff = time.time() - TOMBSTONE_TTL_S
            for old in [n for n, e in self._names.items() if e.get("gone") and e["at"] < cutoff]:
                del self._names[old]
            return self._version

    # -- reading --------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """Live replicas' snapshots, the live names and the table version."""
        with self._lock:
            return {
                "replicas": dict(self._live()),
                "names": {n: e for n, e in self._names.items() if not e.get("gone")},
                "version": self._version,
            }
