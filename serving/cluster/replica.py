"""One engine replica: a Serve deployment around one Engine, its loop and a job worker.

Requests reach it through the deployment handle. With ``multiplexed_model_id=<adapter>``
Serve's router sends a request to a replica that advertises that adapter (model
multiplexing); a replica advertises the adapters it served last (an LRU of ``max_adapters``
ids), so an adapter's traffic keeps landing where its weights already are. The engine's
own pool decides what is resident; the advertised set is sized to match it.

The replica reuses the embedded server's LocalBackend for everything engine-side (adapter
resolution and validation, submission, listing), reports a snapshot to the directory
about twice a second, and runs fine-tune jobs from the shared store on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any

import ray
from ray import serve

from adapterhub import settings
from serving.api.backend import LocalBackend, retried
from serving.api.status import classify
from serving.cluster.config import ClusterConfig
from serving.cluster.messages import Accepted, Refused
from serving.cluster.registry import LazyRegistry
from serving.engine.errors import AdapterNotFound
from serving.engine.loop import EngineLoop
from serving.engine.outputs import RequestOutput
from serving.engine.sampling import SamplingParams

log = logging.getLogger("adapterhub.cluster")


def refusal(exc: BaseException) -> Refused | None:
    """A client error as data (exact status and message); None for a server fault."""
    known = classify(exc)
    return None if known is None else Refused(known[0].name, known[1])


def build_engine_loop(cfg: ClusterConfig) -> tuple[EngineLoop, Any]:
    """The replica's engine and loop, and its co-serving hook for jobs (None when off)."""
    import torch

    from serving.engine.config import EngineConfig
    from serving.engine.coserve.options import attach
    from serving.engine.engine import Engine

    # One replica gets num_cpus cores; more torch threads than that only contend.
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    engine = Engine(EngineConfig(
        model=cfg.model_path(), device=cfg.resolved_device(), dtype=getattr(torch, cfg.dtype),
        pool_bytes=cfg.pool_mb * 2**20, num_pages=cfg.num_pages, block_size=cfg.block_size,
        max_num_seqs=cfg.max_num_seqs, max_batched_tokens=cfg.max_batched_tokens,
        max_queue=cfg.max_queue,
        # Its num_cpus cores all go to torch: a LoRA worker thread would run beyond the
        # replica's reservation (Ray does not pin replicas to cores, so auto would see spares).
        lora_worker=False))
    coserving = attach(engine, cfg) if cfg.finetune else None  # reads cfg.coserve*
    return EngineLoop(engine), coserving


@serve.deployment(name="EngineReplica")
class EngineReplica:
    async def __init__(self, config: dict[str, Any], directory: Any) -> None:
        self._stopping = True  # until fully built: __del__ then has nothing to stop
        self.cfg = cfg = ClusterConfig.from_args(config)
        settings.offline_env(cfg.data_dir)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.actor_name = ray.get_runtime_context().get_actor_name()
        self.directory = directory
        self.aio = asyncio.get_running_loop()
        self.data_dir = cfg.resolved_data_dir()
        self.engine_loop, coserving = await asyncio.to_thread(build_engine_loop, cfg)
        self.engine = self.engine_loop.engine
        self.registry = LazyRegistry(self.data_dir, cfg.resolved_tracking_uri())
        self.backend = LocalBackend(self.engine_loop, self.registry, cfg.allow_path_refs)
        self.names: dict[str, dict[str, Any]] = {}  # the directory's name table, as applied
        self.names_version = 0
        self._send_names = False
        self.served: Counter[str] = Counter()
        self.host_loads = 0
        self._load_locks: dict[str, asyncio.Lock] = {}

        async def route_adapter(adapter_id: str) -> str:
            # Only bookkeeping: the adapter is loaded (and validated) before this is called.
            return adapter_id

        self._route = serve.multiplexed(max_num_models_per_replica=int(cfg.max_adapters))(
            route_adapter)
        self.jobs = None
        if cfg.finetune:
            from serving.cluster.jobs import JobWorker

            self.jobs = JobWorker(cfg.job_store_path(), self.data_dir, self.registry,
                                  self.replica_id, on_succeeded=self._job_succeeded,
                                  poll_s=cfg.job_poll_s, max_jobs=cfg.jobs_per_replica,
                                  coserving=coserving).start()
        self._stopping = False
        self._reporter = asyncio.create_task(self._report_forever())
        # Open the registry now, off the request path: the first adapter load would
        # otherwise wait seconds for MLflow.
        self._opening = asyncio.create_task(asyncio.to_thread(self._open_registry))
        log.info("replica %s ready (%s)", self.replica_id, cfg.resolved_device())

    def _open_registry(self) -> None:
        try:
            self.registry.open()
        except Exception:  # noqa: BLE001 - an unreachable registry fails its requests later
            log.warning("replica %s cannot open the registry", self.replica_id, exc_info=True)

    # -- requests ---------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       adapter: str | None, deadline_s: float | None
                       ) -> AsyncIterator[Accepted | Refused | RequestOutput]:
        """Accepted or Refused first, then the engine's outputs up to the final one."""
        adapter = adapter or None
        try:
            if adapter:
                await self._ensure(adapter)
                if serve.get_multiplexed_model_id() == adapter:
                    await self._route(adapter)  # advertise it: its next requests come here
            handle = await asyncio.to_thread(self.backend.submit, prompt, params, adapter,
                                             deadline_s)
        except Exception as exc:  # noqa: BLE001 - client errors become a Refused item
            refused = refusal(exc)
            if refused is None:
                raise
            yield refused
            return
        self.served[adapter or ""] += 1
        request_id = f"{self.replica_id}/{handle.request_id}"
        yield Accepted(request_id, self.replica_id)
        try:
            async for out in handle.astream():  # cancelling this stream aborts the request
                # A copy: the engine loop still reads the object it delivered.
                yield replace(out, request_id=request_id)
        except RuntimeError as exc:
            if not self._stopping:
                raise
            yield Refused("UNAVAILABLE", f"replica {self.replica_id} is shutting down: {exc}")

    async def _ensure(self, name: str) -> None:
        """Put ``name`` in the host store: its cluster-wide source if it has one (loaded
        through the API), else resolved as a reference, as the embedded server does."""
        if name in self.engine.store:
            return
        lock = self._load_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.engine.store:
                return
            entry = self.names.get(name)
            if entry is not None and not entry.get("gone"):
                await asyncio.to_thread(self.backend.load_adapter, name, entry["source"])
            else:
                await asyncio.to_thread(self.backend.ensure_adapter, name, True)
            self.host_loads += 1
        if len(self._load_locks) > 4096:  # names come from clients; keep the map bounded
            self._load_locks = {k: v for k, v in self._load_locks.items() if v.locked()}

    # -- adapters -----------------------------------------------------------------------------
    async def load_adapter(self, name: str, source: str) -> dict[str, Any] | Refused:
        """AdapterService.Load on this replica (the API then publishes the name)."""
        try:
            info = await asyncio.to_thread(self.backend.load_adapter, name, source)
        except Exception as exc:  # noqa: BLE001 - client errors become a Refused reply
            refused = refusal(exc)
            if refused is None:
                raise
            return refused
        self.host_loads += 1
        if serve.get_multiplexed_model_id() == name:
            await self._route(name)
        return {**asdict(info), "replica": self.replica_id}

    async def _apply_names(self, version: int, table: dict[str, dict[str, Any]]) -> None:
        """Follow the directory's table: drop unloaded names, reload replaced sources."""
        old, self.names, self.names_version = self.names, table, version
        for name, entry in table.items():
            if old.get(name) == entry or name not in self.engine.store:
                continue
            try:
                if entry.get("gone"):
                    await asyncio.to_thread(self.backend.unload_adapter, name)
                elif self.engine.store.get(name).source != entry["source"]:
                    await asyncio.to_thread(self.backend.load_adapter, name, entry["source"])
                    self.host_loads += 1
            except (AdapterNotFound, KeyError, AttributeError):
                continue  # unloaded meanwhile
            except Exception:  # noqa: BLE001 - a bad source fails its requests, not the loop
                log.warning("replica %s cannot apply %s", self.replica_id, name, exc_info=True)

    def _job_succeeded(self, job: Any) -> None:
        """A job this replica ran registered its adapter: serve it here at once and publish
        the name (runs on the job thread, before watchers see SUCCEEDED)."""
        name = job.spec.name
        try:  # which replica finished it, on the run (a resumed job names its new replica)
            self.registry.client.set_tag(job.run_id, "adapterhub.replica", self.replica_id)
        except Exception:  # noqa: BLE001 - bookkeeping only
            log.warning("cannot tag run %s", job.run_id, exc_info=True)
        info = self.backend.load_adapter(name, job.adapter_ref)
        self.host_loads += 1
        version = self.directory.set_name.remote(name, job.adapter_ref,
                                                 asdict(info)).result(timeout_s=30)
        entry = {"source": job.adapter_ref, "info": asdict(info), "version": version}
        asyncio.run_coroutine_threadsafe(self._adopt(name, entry), self.aio).result(30)

    async def _adopt(self, name: str, entry: dict[str, Any]) -> None:
        self.names = {**self.names, name: entry}
        await self._route(name)

    # -- reporting ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """The engine side of a report (read on a worker thread: it walks the store)."""
        return {
            "replica": self.replica_id,
            "actor_name": self.actor_name,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "time": time.time(),
            "stats": self.backend.stats(),
            "adapters": [asdict(a) for a in self.backend.list_adapters()],
            "resident": sorted(retried(self.engine.cache.resident_names)),
            "jobs": self.jobs.running_ids() if self.jobs else [],
            "registry_ready": self.registry.ready,
        }

    def _loop_fields(self) -> dict[str, Any]:
        """What the event loop mutates, read on the event loop."""
        # Serve keeps the advertised ids on the multiplexed function it wraps.
        wrapper = getattr(self._route, "__serve_multiplex_wrapper", None)
        fields = {
            "routing": sorted(wrapper.models) if wrapper is not None else [],
            "served": dict(self.served),
            "host_loads": self.host_loads,
            "names_version": self.names_version,
        }
        if self._send_names:
            fields["names"] = self.names
        return fields

    async def _report_forever(self) -> None:
        while not self._stopping:
            try:
                snap = await asyncio.to_thread(self.snapshot)
                snap.update(self._loop_fields())
                reply = await self.directory.report.remote(snap)
                self._send_names = bool(reply.get("send_names"))
                if "names" in reply:
                    await self._apply_names(reply["version"], reply["names"])
            except Exception:  # noqa: BLE001 - the directory restarts; keep reporting
                log.warning("replica %s cannot report", self.replica_id, exc_info=True)
            await asyncio.sleep(self.cfg.report_interval_s)

    def check_health(self) -> None:
        """Serve's periodic probe: a replica whose engine thread died is replaced."""
        thread = getattr(self.engine_loop, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError(f"replica {self.replica_id}: the engine loop thread died")

    async def info(self) -> dict[str, Any]:
        """This replica's snapshot, straight from it (tests and debugging)."""
        snap = await asyncio.to_thread(self.snapshot)
        snap.update(self._loop_fields())
        return snap

    # -- shutdown -----------------------------------------------------------------------------
    def __del__(self) -> None:
        # Serve calls this on a graceful stop (scale down, redeploy, delete). A running job
        # stops at its next step and stays RUNNING; another replica resumes it.
        if getattr(self, "_stopping", True):
            return
        self._stopping = True
        self._reporter.cancel()
        if self.jobs is not None:
            self.jobs.stop(timeout=30)
        try:
            self.directory.forget.remote(self.replica_id)
        except Exception:  # noqa: BLE001 - the directory may be gone first
            pass
        self.engine_loop.shutdown()
