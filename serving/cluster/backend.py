"""The servicers' backend over a Ray Serve deployment of engine replicas.

Same interface as serving/api/backend.py's LocalBackend, so the gRPC API (auth, TLS,
streaming, status codes) is the embedded server's, unchanged. Inference goes through the
deployment handle as a stream (``handle.options(stream=True)``); with affinity routing the
adapter is the request's ``multiplexed_model_id``, so Serve's router prefers a replica that
already holds it. Adapter listings and engine statistics come from the directory's view
of the replicas' reports (at most ``report_interval_s`` old).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from serving.api.backend import AdapterInfo, load_name
from serving.api.status import ApiError
from serving.cluster.messages import Refused
from serving.cluster.request import MAX_ATTEMPTS, RETRY_BACKOFF_S, RETRYABLE, ClusterRequest, Pump
from serving.engine.errors import AdapterNotFound
from serving.engine.sampling import SamplingParams

ROUTINGS = ("affinity", "random")
ACCEPT_TIMEOUT_S = 300.0  # a cold adapter may come from a remote registry
PROPAGATE_TIMEOUT_S = 10.0
_INFO = ("name", "source", "method", "max_rank", "host_bytes", "resident", "running", "waiting")


def _refused(reply: Any) -> Any:
    if isinstance(reply, Refused):
        raise ApiError(grpc.StatusCode[reply.code], reply.message)
    return reply


class ClusterBackend:
    """``routing="random"`` leaves the adapter out of routing (the benchmark's baseline)."""

    def __init__(self, handle: Any, directory: Any, routing: str = "affinity",
                 view_ttl_s: float = 0.25, on_shutdown: Callable[[], None] | None = None
                 ) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        self.handle = handle
        self.directory = directory
        self.routing = routing
        self.view_ttl_s = view_ttl_s
        self.on_shutdown = on_shutdown
        self.pump = Pump()
        self._view: dict[str, Any] | None = None
        self._view_at = 0.0
        self._view_lock = threading.Lock()
        self._closed = False

    # -- inference ------------------------------------------------------------------------
    def submit(self, prompt: str | list[int], params: SamplingParams, adapter: str | None,
               deadline_s: float | None) -> ClusterRequest:
        """Send to a replica and wait until it queued the request (errors raise here)."""
        adapter = adapter or None
        options: dict[str, Any] = {"stream": True}
        if adapter and self.routing == "affinity":
            options["multiplexed_model_id"] = adapter

        def call(remaining: float | None) -> Any:
            return self.handle.options(**options).generate.remote(prompt, params, adapter,
                                                                   remaining)

        request = ClusterRequest(self.pump, call, deadline_s)
        request.wait_accepted(ACCEPT_TIMEOUT_S if deadline_s is None else deadline_s + 1.0)
        return request

    # -- one-shot calls -----------------------------------------------------------------------
    def _call(self, make: Callable[[], Any], timeout_s: float = 120.0) -> Any:
        """A unary replica or directory call, retried while a replica is being replaced."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return make().result(timeout_s=timeout_s)
            except RETRYABLE as exc:
                if attempt == MAX_ATTEMPTS:
                    raise ApiError(grpc.StatusCode.UNAVAILABLE,
                                   f"cluster call failed ({type(exc).__name__})") from None
                time.sleep(RETRY_BACKOFF_S * attempt)
            except TimeoutError:
                raise ApiError(grpc.StatusCode.UNAVAILABLE,
                               f"no answer from the cluster within {timeout_s:.0f}s") from None
        raise AssertionError("unreachable")

    def view(self, fresh: bool = False) -> dict[str, Any]:
        """The directory's view: live replicas' snapshots and the cluster-wide names."""
        with self._view_lock:
            now = time.monotonic()
            if fresh or self._view is None or now - self._view_at > self.view_ttl_s:
                self._view = self._call(lambda: self.directory.view.remote(), timeout_s=30)
                self._view_at = time.monotonic()
            return self._view

    def replicas(self) -> dict[str, dict[str, Any]]:
        return self.view()["replicas"]

    def wait_propagated(self, version: int, timeout: float = PROPAGATE_TIMEOUT_S) -> bool:
        """Wait until every live replica applied name-table ``version`` (best effort)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            snaps = self.view(fresh=True)["replicas"].values()
            if all(s.get("names_version", 0) >= version for s in snaps):
                return True
            time.sleep(0.1)
        return False

    # -- adapters ---------------------------------------------------------------------------
    def load_adapter(self, name: str, source: str) -> AdapterInfo:
        """Load on one replica (which validates it), then publish the name cluster-wide."""
        name = load_name(name, source)
        reply = _refused(self._call(lambda: self.handle.options(
            multiplexed_model_id=name).load_adapter.remote(name, source)))
        replica = reply.pop("replica")
        fields = {k: reply[k] for k in _INFO}
        version = self._call(lambda: self.directory.set_name.remote(name, source, fields))
        self.wait_propagated(version)
        return AdapterInfo(**fields, replicas=[replica] if fields["resident"] else [])

    def unload_adapter(self, name: str) -> None:
        view = self.view(fresh=True)
        held = name in view["names"] or any(
            a["name"] == name for s in view["replicas"].values() for a in s["adapters"])
        if not held:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        self.wait_propagated(self._call(lambda: self.directory.drop_name.remote(name)))

    def publish(self, sources: dict[str, str]) -> None:
        """Name many adapters cluster-wide at once, loaded lazily where first requested
        (no validation here: a bad source fails its requests with the loader's status)."""
        entries = {name: (source, None) for name, source in sources.items()}
        self.wait_propagated(self._call(lambda: self.directory.set_names.remote(entries)))

    def unpublish(self, names: list[str]) -> None:
        """Unload many names everywhere at once."""
        self.wait_propagated(self._call(lambda: self.directory.drop_names.remote(names)))

    def get_adapter(self, name: str) -> AdapterInfo:
        info = self._merged(self.view()).get(name)
        if info is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        return info

    def list_adapters(self) -> list[AdapterInfo]:
        merged = self._merged(self.view())
        return [merged[n] for n in sorted(merged)]

    @staticmethod
    def _merged(view: dict[str, Any]) -> dict[str, AdapterInfo]:
        """One entry per adapter name over all replicas; ``replicas`` = where resident."""
        out: dict[str, AdapterInfo] = {}
        for rid, snap in sorted(view["replicas"].items()):
            for a in snap["adapters"]:
                info = out.get(a["name"])
                if info is None:
                    info = out[a["name"]] = AdapterInfo(
                        **{k: a[k] for k in _INFO if k not in ("resident", "running",
                                                                 "waiting")},
                        resident=False, running=0, waiting=0)
                if a["resident"]:
                    info.resident = True
                    info.replicas.append(rid)
                info.running += a["running"]
                info.waiting += a["waiting"]
        for name, entry in view["names"].items():
            if name in out:
                out[name].source = entry["source"]
                continue
            i = entry.get("info") or {}  # published but held by no live replica right now
            out[name] = AdapterInfo(name, entry["source"], i.get("method", ""),
                                    i.get("max_rank", 0), i.get("host_bytes", 0), False, 0, 0)
        return out

    # -- statistics -------------------------------------------------------------------------
    def stats(self) -> dict:
        """Engine statistics summed over live replicas (the embedded keys), plus per replica."""
        total: dict[str, Any] = {
            "pool": {"total_pages": 0, "free_pages": 0, "kv_pages": 0, "adapter_pages": 0},
            "running": 0, "waiting": 0, "adapters_registered": 0, "adapters_resident": 0,
            "tokens_generated": 0, "per_adapter": {}, "replicas": {},
        }
        try:
            replicas = self.view()["replicas"]
        except ApiError:  # directory unreachable: report nothing rather than fail a scrape
            replicas = {}
        for rid, snap in sorted(replicas.items()):
            s = snap["stats"]
            total["replicas"][rid] = s
            for key, value in s.items():
                if key == "pool":
                    for k, v in value.items():
                        if k != "page_bytes":
                            total["pool"][k] = total["pool"].get(k, 0) + v
                elif key == "per_adapter":
                    for name, counts in value.items():
                        entry = total["per_adapter"].setdefault(name, {})
                        for k, v in counts.items():
                            entry[k] = entry.get(k, 0) + v
                elif isinstance(value, int | float) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        return total

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.pump.stop()
        if self.on_shutdown is not None:
            self.on_shutdown()
