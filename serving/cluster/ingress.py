"""The gRPC API inside the Serve application: the ingress a RayService exposes.

Ray Client (``ray://``) cannot stream from deployment handles, so a gRPC server outside the
cluster that reaches it through Ray Client could not stream tokens. With ``grpc_port`` set,
build_app adds this deployment: it runs the same Server as ``adapterhub serve`` (auth, TLS,
health, reflection, metrics, drain) with a ClusterBackend, on a Ray node, next to the
replicas. It is pinned to the head node by default, whose Kubernetes service then carries
the port.
"""

from __future__ import annotations

import logging
from typing import Any

from serving.cluster.config import ClusterConfig

log = logging.getLogger("adapterhub.cluster")


def build_server(cfg: ClusterConfig, engine: Any, directory: Any, server_config: Any,
                 on_shutdown: Any = None) -> Any:
    """A (not yet started) gRPC Server over the application's replicas: shared by this
    ingress and `adapterhub serve --ray`."""
    from serving.api import Server
    from serving.cluster.backend import ClusterBackend
    from serving.cluster.metrics import ClusterCollector

    backend = ClusterBackend(engine, directory, on_shutdown=on_shutdown)
    try:
        server_config.base_model = cfg.model_path()
        jobs = None
        if cfg.finetune:
            from serving.cluster.jobs import ClusterJobManager, ReplicasCoserving

            shared = cfg.resolved_data_dir()
            roots = cfg.dataset_roots or ([shared / "datasets"] if server_config.api_keys
                                          else None)
            coserving = None if cfg.coserve == "off" else ReplicasCoserving(cfg.model_path())
            jobs = ClusterJobManager(cfg.job_store_path(), shared,
                                     base_model=server_config.base_model,
                                     allowed_dataset_roots=roots, coserving=coserving)
        server = Server(None, jobs, None, server_config, backend=backend)
        server.metrics.registry.register(ClusterCollector(backend))
        return server
    except BaseException:
        backend.shutdown()
        raise


class GrpcIngress:
    """One gRPC server per ingress replica (bound to ``grpc_host:grpc_port`` on its node)."""

    def __init__(self, config: dict[str, Any], engine: Any, directory: Any) -> None:
        from adapterhub import settings
        from serving.api import ServerConfig
        from serving.api.auth import load_api_keys

        cfg = ClusterConfig.from_args(config)
        settings.offline_env(cfg.data_dir)
        server_config = ServerConfig(
            host=cfg.grpc_host, port=int(cfg.grpc_port), api_keys=load_api_keys(
                cfg.api_keys_file), tls_cert=cfg.tls_cert, tls_key=cfg.tls_key,
            tls_client_ca=cfg.tls_client_ca, metrics_port=int(cfg.metrics_port),
            metrics_host=cfg.metrics_host, allow_path_refs=cfg.allow_path_refs)
        self.server = build_server(cfg, engine, directory, server_config).start()
        log.info("gRPC ingress on %s", self.server.address)

    def address(self) -> str:
        return self.server.address

    def check_health(self) -> None:
        if self.server.wait(0):
            raise RuntimeError("the gRPC server stopped")

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()
