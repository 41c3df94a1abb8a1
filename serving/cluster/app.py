"""The Ray Serve application: ``serving.cluster.app:build_app`` (the RayService import path).

    build_app({"base_model": "/models/base", "num_replicas": 2, "num_gpus": 0.5,
               "max_adapters": 64, "tracking_uri": "postgresql://...", "data_dir": "/data"})

Deployments: EngineReplica (``num_replicas`` engines, each with ``num_cpus``/``num_gpus``,
fractions allowed; routed by router.py's adapter-affinity router), ReplicaDirectory (one,
no resources) and, with ``grpc_port``, GrpcIngress: the public gRPC API inside the
application (ingress.py), which a RayService exposes. Without it the API is served by
``adapterhub serve --ray`` on a Ray node, which attaches to (or deploys) the application.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serving.cluster.config import ClusterConfig
from serving.cluster.directory import ReplicaDirectory
from serving.cluster.ingress import GrpcIngress
from serving.cluster.replica import EngineReplica

DIRECTORY = "ReplicaDirectory"
REPLICA = "EngineReplica"
INGRESS = "GrpcIngress"
ROUTER = "serving.cluster.router:AdapterAffinityRouter"

# Replica processes start from the raylet's environment, not the caller's: keep them
# offline, quiet and from spinning idle OpenMP threads on cores other replicas share.
REPLICA_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
}


class Directory(ReplicaDirectory):
    """The directory as deployed: it also hands out the application's configuration."""

    def __init__(self, config: dict[str, Any], ttl_s: float) -> None:
        super().__init__(ttl_s)
        self._config = config

    def config(self) -> dict[str, Any]:
        return self._config


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application for ``serve.run`` or a RayService ``import_path`` (args as a dict)."""
    cfg = ClusterConfig.from_args(args)
    config = cfg.to_args()
    # A replica that missed this many reports is gone (its snapshot leaves the view).
    ttl_s = max(3.0, 6 * cfg.report_interval_s)
    directory = serve.deployment(Directory, name=DIRECTORY, num_replicas=1,
                                 max_ongoing_requests=1000,
                                 ray_actor_options={"num_cpus": 0}).bind(config, ttl_s)
    replica = EngineReplica.options(
        name=REPLICA,
        num_replicas=int(cfg.num_replicas),
        max_ongoing_requests=int(cfg.max_ongoing_requests),
        health_check_period_s=cfg.health_check_period_s,
        graceful_shutdown_timeout_s=15,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER,
            request_router_kwargs={"imbalance": int(cfg.affinity_imbalance)}),
        ray_actor_options={
            "num_cpus": float(cfg.num_cpus),
            "num_gpus": float(cfg.num_gpus),
            "runtime_env": {"env_vars": {**REPLICA_ENV, **(cfg.env_vars or {})}},
        },
    )
    app = replica.bind(config, directory)
    if not cfg.grpc_port:
        return app
    resources = {"node:__internal_head__": 0.001} if cfg.ingress_on_head else {}
    ingress = serve.deployment(GrpcIngress, name=INGRESS, num_replicas=1,
                               ray_actor_options={"num_cpus": 0, "resources": resources,
                                                  "runtime_env": {"env_vars": REPLICA_ENV}})
    return ingress.bind(config, app, directory)
