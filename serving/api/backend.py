"""What the servicers need from an engine, implemented over one in-process EngineLoop.

A cluster mode implements the same methods over its replicas; the servicers do not change.
Adapter references are resolved and loaded here, on the caller's thread and outside the
loop's submit lock, so a slow registry lookup or file read never stalls token delivery.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc

from adapterhub.errors import RegistryError
from adapterhub.registry.refs import MODELS_SCHEME, looks_like_path, parse_ref, validate_name
from serving.api.status import ApiError
from serving.engine.adapter_loader import load_host_adapter
from serving.engine.errors import AdapterNotFound
from serving.engine.loop import EngineLoop, RequestHandle
from serving.engine.sampling import SamplingParams

T = TypeVar("T")


@dataclass
class AdapterInfo:
    name: str
    source: str
    method: str
    max_rank: int
    host_bytes: int
    resident: bool
    running: int
    waiting: int
    # Cluster mode: the replicas whose device pool holds it (empty in embedded mode).
    replicas: list[str] = field(default_factory=list)


class RequestLike(Protocol):
    """What ``submit`` returns: an engine RequestHandle or a cluster request."""

    request_id: str
    final: Any

    def stream(self, timeout: float | None = None) -> Iterator[Any]: ...

    def cancel(self) -> None: ...


class Backend(Protocol):
    """The interface the servicers and the server use (LocalBackend, ClusterBackend)."""

    def submit(self, prompt: str, params: SamplingParams, adapter: str | None,
               deadline_s: float | None) -> RequestLike: ...

    def load_adapter(self, name: str, source: str) -> AdapterInfo: ...

    def unload_adapter(self, name: str) -> None: ...

    def get_adapter(self, name: str) -> AdapterInfo: ...

    def list_adapters(self) -> list[AdapterInfo]: ...

    def stats(self) -> dict: ...

    def shutdown(self) -> None: ...


def retried(fn: Callable[[], T], tries: int = 5) -> T:
    # Engine.stats() and the cache's resident list walk dicts that the loop thread mutates;
    # a rare "changed size during iteration" is retried rather than failing an RPC.
    for _ in range(tries - 1):
        try:
            return fn()
        except RuntimeError:
            continue
    return fn()


def load_name(name: str, source: str) -> str:
    """The name a Load request registers under (the source when unnamed), checked."""
    if not source:
        raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "source is empty")
    if name and name != source:
        validate_name(name)  # RegistryError -> INVALID_ARGUMENT
    return name or source


def engine_stats(engine: Any) -> dict:
    return retried(engine.stats)


class LocalBackend:
    def __init__(self, loop: EngineLoop, registry: Any = None,
                 allow_path_refs: bool = False) -> None:
        self.loop = loop
        self.engine = loop.engine
        self.registry = registry
        self.allow_path_refs = allow_path_refs
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- inference --------------------------------------------------------------------
    def submit(self, prompt: str, params: SamplingParams, adapter: str | None,
               deadline_s: float | None) -> RequestHandle:
        self.engine.check_capacity()  # before loading an adapter for a request we would refuse
        if adapter:
            self.ensure_adapter(adapter, from_request=True)
        return self.loop.submit(prompt, params, adapter or None, deadline_s)

    def ensure_adapter(self, ref: str, from_request: bool = False) -> None:
        """Make ``ref`` servable: already registered, or resolved and loaded under its ref."""
        if ref in self.engine.store:
            return
        with self._lock_for(ref):
            if ref not in self.engine.store:
                self._register(ref, self.resolve(ref, from_request), ref)

    def resolve(self, ref: str, from_request: bool = False) -> Path:
        """A local adapter directory for a registry reference or (if allowed) a path."""
        try:
            parse_ref(ref)
        except RegistryError as exc:
            if not (looks_like_path(ref) or Path(ref).is_absolute()):
                raise  # malformed reference -> INVALID_ARGUMENT
            return self._local(ref, from_request, exc)
        if self.registry is None:
            raise AdapterNotFound(f"adapter {ref!r} is not loaded (no registry configured)")
        if from_request and not self.allow_path_refs and not ref.startswith(MODELS_SCHEME):
            # Registry.resolve tries a local directory of that name first; "name/1" must
            # not reach the file system when paths are not allowed.
            return Path(self.registry.resolve(MODELS_SCHEME + ref))
        return Path(self.registry.resolve(ref))

    def _local(self, ref: str, from_request: bool, why: RegistryError) -> Path:
        if from_request and not self.allow_path_refs:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{why}; local adapter paths are not accepted in inference "
                           "requests (Load the adapter first)")
        if self.registry is not None:
            return Path(self.registry.resolve(ref))
        path = Path(ref).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise AdapterNotFound(f"{ref!r} is not an adapter directory")
        return path.resolve()

    def _register(self, name: str, path: Path, source: str | None = None) -> None:
        # The file read and validation happen here; only the store update takes the lock.
        adapter = load_host_adapter(name, path, self.engine.runner.model, self.engine.config.dtype)
        adapter.source = source or str(path)
        self.loop.run_in_loop(self.engine.register_adapter, name, adapter)

    def _lock_for(self, ref: str) -> threading.Lock:
        with self._locks_guard:
            if len(self._locks) > 4096:  # names come from clients; keep the map bounded
                self._locks = {k: v for k, v in self._locks.items() if v.locked()}
            return self._locks.setdefault(ref, threading.Lock())

    # -- adapters ---------------------------------------------------------------------
    def load_adapter(self, name: str, source: str) -> AdapterInfo:
        name = load_name(name, source)
        with self._lock_for(name):
            self._register(name, self.resolve(source), source)
        return self.get_adapter(name)

    def unload_adapter(self, name: str) -> None:
        self.loop.run_in_loop(self.engine.unregister_adapter, name)

    def get_adapter(self, name: str) -> AdapterInfo:
        if name not in self.engine.store:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        return self._info(name, self._resident(), engine_stats(self.engine)["per_adapter"])

    def list_adapters(self) -> list[AdapterInfo]:
        resident = self._resident()
        per = engine_stats(self.engine)["per_adapter"]
        infos = []
        for name in sorted(self.engine.store.names()):
            try:
                infos.append(self._info(name, resident, per))
            except AdapterNotFound:
                continue  # unloaded meanwhile
        return infos

    def _resident(self) -> set[str]:
        return set(retried(self.engine.cache.resident_names))

    def _info(self, name: str, resident: set[str], per: dict) -> AdapterInfo:
        a = self.engine.store.get(name)
        if a is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        counts = per.get(name, {})
        return AdapterInfo(a.name, a.source, a.method, a.max_rank, a.nbytes, name in resident,
                           counts.get("running", 0), counts.get("waiting", 0))

    def stats(self) -> dict:
        return engine_stats(self.engine)

    def shutdown(self) -> None:
        """Stop the engine loop (after the server drained)."""
        self.loop.shutdown()
