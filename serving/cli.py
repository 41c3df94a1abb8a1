"""`adapterhub serve`: the gRPC server over the embedded engine, registry and job manager.

Registered through the ``adapterhub.commands`` entry point group (the core CLI never
imports serving). Heavy imports happen inside ``run_server`` so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any

log = logging.getLogger("adapterhub.api")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="base checkpoint directory (default: the shipped base model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address; anything but loopback requires API keys")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0 = any free port)")
    p.add_argument("--data-dir", help="data directory (default: $ADAPTERHUB_HOME or ~/.adapterhub)")
    p.add_argument("--api-keys-file", help="one key[:role] per line, role user|admin "
                   "(also $ADAPTERHUB_API_KEYS, comma-separated)")
    p.add_argument("--tls-cert", help="PEM server certificate chain (enables TLS)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA; clients must present a certificate (mTLS)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus metrics on 127.0.0.1:PORT (0 = off)")
    p.add_argument("--pool-mb", type=int, default=256, help="unified KV/adapter pool size")
    p.add_argument("--max-queue", type=int, default=4096, help="waiting requests beyond this "
                   "are refused with RESOURCE_EXHAUSTED")
    p.add_argument("--max-batched-tokens", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--workers", type=int, default=32, help="gRPC worker threads (one per stream)")
    p.add_argument("--grace", type=float, default=10.0,
                   help="seconds to let in-flight requests finish on shutdown")
    p.add_argument("--dataset-root", action="append", default=None,
                   help="directory fine-tune jobs may read datasets from (repeatable; "
                   "default: any path, or only <data-dir>/datasets when API keys are set)")
    p.add_argument("--allow-path-refs", action="store_true",
                   help="let inference requests name local adapter directories")
    p.add_argument("--no-finetune", action="store_true", help="serve without the job manager")
    from serving.engine.coserve.options import add_arguments as add_coserve_arguments

    add_coserve_arguments(p)  # --coserve and its latency targets
    from serving.cluster.cli import add_arguments as add_cluster_arguments

    add_cluster_arguments(p)  # --ray [ADDRESS] and the replica flags


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Entry point of the ``adapterhub.commands`` group: adds ``serve``."""
    p = subparsers.add_parser("serve", help="serve adapters and fine-tune jobs over gRPC")
    add_arguments(p)
    p.set_defaults(func=run_server)
    return p


def _job_manager(args: Any, data_dir: Any, registry: Any, backend: Any, model: str,
                 exposed: bool, coserving: Any = None) -> Any:
    if args.no_finetune:
        return None
    try:
        from adapterhub.jobs.manager import JobManager
    except ImportError as exc:
        log.warning("fine-tune jobs are disabled: %s", exc)
        return None

    # A server that takes API keys is meant to be reached from elsewhere: unless told
    # otherwise, its jobs read dataset files only from <data-dir>/datasets.
    roots = args.dataset_root or ([data_dir / "datasets"] if exposed else None)
    return JobManager(data_dir / "jobs.db", data_dir, registry=registry,
                      on_succeeded=serve_finished(backend), base_model=model,
                      allowed_dataset_roots=roots, coserving=coserving)


def serve_finished(backend: Any) -> Any:
    """The job manager's on_succeeded: serve the new adapter at once, without a restart."""

    def on_succeeded(job: Any) -> None:
        spec = job.spec.to_dict() if hasattr(job.spec, "to_dict") else job.spec
        try:
            backend.load_adapter(spec["name"], job.adapter_ref)
            log.info("serving adapter %s (%s)", spec["name"], job.adapter_ref)
        except Exception:  # noqa: BLE001 - a bad artifact must not stop the job manager
            log.exception("could not serve adapter %s from %s", spec["name"], job.adapter_ref)

    return on_succeeded


def server_config(args: Any) -> Any:
    from serving.api import ServerConfig
    from serving.api.auth import load_api_keys

    if args.model:
        model = args.model
    else:
        from adapterhub.basemodel import default_base_path

        model = str(default_base_path())
    return ServerConfig(
        host=args.host, port=args.port, api_keys=load_api_keys(args.api_keys_file),
        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
        max_workers=args.workers, metrics_port=args.metrics_port, grace_s=args.grace,
        allow_path_refs=args.allow_path_refs, base_model=model)


def build(args: Any, config: Any) -> Any:
    """Registry, engine, loop, job manager and the (not yet started) server."""
    if getattr(args, "ray", None):
        from serving.cluster.cli import build_server

        return build_server(args, config)  # replicas on Ray instead of an embedded engine
    import torch

    from adapterhub import settings
    from adapterhub.registry import Registry
    from serving.api import Server
    from serving.api.backend import LocalBackend
    from serving.engine.config import EngineConfig
    from serving.engine.coserve.options import attach as attach_coserve
    from serving.engine.engine import Engine
    from serving.engine.loop import EngineLoop

    data_dir = settings.data_dir(args.data_dir)
    registry = Registry(data_dir)
    engine = Engine(EngineConfig(
        model=config.base_model, device=args.device, dtype=getattr(torch, args.dtype),
        pool_bytes=args.pool_mb * 2**20, max_queue=args.max_queue,
        max_batched_tokens=args.max_batched_tokens), resolver=registry.resolve)
    coserving = None if args.no_finetune else attach_coserve(engine, args)
    loop = EngineLoop(engine)
    try:
        backend = LocalBackend(loop, registry, args.allow_path_refs)
        jobs = _job_manager(args, data_dir, registry, backend, config.base_model,
                            bool(config.api_keys), coserving)
        return Server(loop, jobs, registry, config, backend=backend)
    except BaseException:
        loop.shutdown()
        raise


def run_server(args: Any, stop: threading.Event | None = None, ready: Any = None) -> int:
    """Build everything, serve until SIGINT/SIGTERM (or ``stop``), then drain.

    ``ready(server)`` is called once the server listens (tests use it to find the port).
    """
    from adapterhub import settings

    settings.offline_env(args.data_dir)
    from serving.api.config import check_bind
    from serving.api.logs import json_logging

    config = server_config(args)
    check_bind(config)  # before seconds of MLflow and model loading
    stop = stop or threading.Event()
    with json_logging():
        server = build(args, config)
        try:
            if server.job_manager is not None:
                server.job_manager.start()
            server.start()
        except BaseException:
            server.stop(0)
            raise
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        extra = f", metrics on 127.0.0.1:{server.metrics.port}" if server.metrics.port else ""
        print(f"adapterhub serving on {server.address}{extra}", flush=True)
        if ready is not None:
            ready(server)
        try:
            while not stop.wait(0.5):  # a timed wait lets signal handlers run promptly
                pass
        finally:
            print("draining...", file=sys.stderr, flush=True)
            server.stop()
    return 0
