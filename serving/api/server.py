"""The gRPC server: servicers, health, reflection, API keys, TLS, metrics, graceful drain.

Shutdown order: health turns NOT_SERVING, new calls get UNAVAILABLE, in-flight calls get
up to the grace period to finish (the engine keeps running for them), then what is left is
cancelled and the job manager and engine loop stop.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapterhub.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    finetune_pb2,
    finetune_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)
from serving.api.adapters import AdapterServicer
from serving.api.auth import ApiKeyInterceptor
from serving.api.backend import LocalBackend
from serving.api.calls import CallTracker
from serving.api.config import ServerConfig, check_bind
from serving.api.finetune import FineTuneServicer
from serving.api.inference import InferenceServicer
from serving.api.metrics import Metrics
from serving.api.tls import server_credentials
from serving.engine.loop import EngineLoop

log = logging.getLogger("adapterhub.api")

SERVICES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    finetune_pb2.DESCRIPTOR.services_by_name["FineTuneService"].full_name,
)


class Server:
    """One gRPC server over one engine loop (and optionally a job manager and a registry)."""

    def __init__(self, engine_loop: EngineLoop | None, job_manager: Any = None,
                 registry: Any = None, config: ServerConfig | None = None,
                 backend: Any = None) -> None:
        self.config = config = config or ServerConfig()
        check_bind(config)
        self.engine_loop = engine_loop
        self.job_manager = job_manager
        self.backend = backend or LocalBackend(engine_loop, registry, config.allow_path_refs)
        self.metrics = Metrics(self.backend.stats, job_manager.list if job_manager else None)
        self.calls = CallTracker(self.metrics.on_status)
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

        interceptors = [ApiKeyInterceptor(config.api_keys, self._denied)] if config.api_keys \
            else []
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a port in use must fail, not be silently shared
        ]
        self.grpc_server = grpc.server(
            ThreadPoolExecutor(config.max_workers, thread_name_prefix="grpc"),
            interceptors=interceptors, options=options,
            maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(self.backend, self.calls, config), self.grpc_server)
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(
            AdapterServicer(self.backend, self.calls), self.grpc_server)
        finetune_pb2_grpc.add_FineTuneServiceServicer_to_server(
            FineTuneServicer(job_manager, self.calls, config.base_model), self.grpc_server)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)

        host = f"[{config.host}]" if ":" in config.host else config.host
        creds = server_credentials(config)
        address = f"{host}:{config.port}"
        try:
            self.port = (self.grpc_server.add_secure_port(address, creds) if creds
                         else self.grpc_server.add_insecure_port(address))
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {address}: {exc}") from None
        self.address = f"{host}:{self.port}"
        self.tls = creds is not None

    def _denied(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self.calls.record("/".join(method.rsplit("/", 2)[-2:]).split(".")[-1], code, started, {})

    def mark_serving(self) -> None:
        for name in ("", *SERVICES):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> Server:
        self.grpc_server.start()
        self.mark_serving()
        if self.config.metrics_port:
            self.metrics.start(self.config.metrics_port, self.config.metrics_host)
        log.info("serving on %s (%s)", self.address, "TLS" if self.tls else "plaintext")
        return self

    def stop(self, grace: float | None = None) -> bool:
        """Drain and stop; True when every in-flight call finished within the grace."""
        with self._stop_lock:
            if self._stopped.is_set():
                return True
            grace = self.config.grace_s if grace is None else grace
            started = time.monotonic()
            self.health.enter_graceful_shutdown()
            self.calls.drain()
            drained = self.calls.wait_idle(grace)
            if not drained:
                log.warning("%d calls still running after %.1fs; cancelling them",
                            self.calls.inflight, grace)
            left = max(0.0, grace - (time.monotonic() - started))
            self.grpc_server.stop(min(left, 1.0)).wait()
            if self.job_manager is not None:
                self.job_manager.stop(timeout=max(left, 5.0))
            self.backend.shutdown()
            self.metrics.stop()
            self._stopped.set()
            return drained

    def wait(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_server(engine_loop: EngineLoop | None, job_manager: Any, registry: Any,
                 config: ServerConfig) -> grpc.Server:
    """The bare grpc.Server (ports bound, not started, health already SERVING).

    The caller owns the engine loop and job manager; Server adds drain, metrics and their
    shutdown, and is what the CLI uses.
    """
    server = Server(engine_loop, job_manager, registry, config)
    server.mark_serving()
    return server.grpc_server
