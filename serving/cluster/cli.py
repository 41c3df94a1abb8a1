"""`adapterhub serve --ray [ADDRESS]`: the gRPC server over a Ray Serve application.

The server process connects to Ray (ADDRESS of a cluster this machine is a node of, or a
local Ray started for it), attaches to the Serve application if it runs or deploys it from
the flags (and deletes it on exit), then serves the unchanged gRPC API with a
ClusterBackend. Jobs are queued in the application's shared job store; its replicas run
them. Ray Client addresses (ray://) are refused: Serve cannot stream through them; a
cluster reached only that way serves the API from inside the application (ingress.py).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("adapterhub.cluster")

LOCAL = "local"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster mode (Ray Serve replicas, adapter-affinity routing)")
    g.add_argument("--ray", nargs="?", const=LOCAL, metavar="ADDRESS",
                   help="serve over Ray: ADDRESS of a cluster (auto, host:6379, "
                   "ray://host:10001), or no value to start a local one")
    g.add_argument("--ray-app", default="adapterhub", help="Serve application name: "
                   "attached to when it runs, else deployed from these flags and deleted on exit")
    g.add_argument("--replicas", type=int, default=2, help="engine replicas")
    g.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica "
                   "(fractions allowed)")
    g.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica "
                   "(fractions allowed, e.g. 0.5)")
    g.add_argument("--max-adapters", type=int, default=64,
                   help="adapters a replica advertises to the router (its pool's share)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI the replicas share "
                   "(default: the data directory's SQLite store)")


def cluster_args(args: Any, base_model: str, data_dir: Path) -> dict[str, Any]:
    """The application's build_app arguments from the `serve` flags."""
    gpus = float(args.replica_gpus)
    return {
        "base_model": base_model,
        "data_dir": str(data_dir),
        "tracking_uri": args.tracking_uri,
        "num_replicas": args.replicas,
        "num_cpus": args.replica_cpus,
        "num_gpus": gpus,
        "max_adapters": args.max_adapters,
        # --device defaults to cpu; replicas given GPUs use them unless told otherwise.
        "device": None if gpus > 0 and args.device == "cpu" else args.device,
        "dtype": args.dtype,
        "pool_mb": args.pool_mb,
        "max_queue": args.max_queue,
        "max_batched_tokens": args.max_batched_tokens,
        "allow_path_refs": args.allow_path_refs,
        "finetune": not args.no_finetune,
        # Co-serving flags of `serve` (serving/engine/coserve/options.py), when present.
        **{k: getattr(args, k) for k in ("coserve", "coserve_min_share",
                                          "coserve_ttft_slo_ms", "coserve_tpot_slo_ms")
           if getattr(args, k, None) is not None},
    }


def connect(address: str) -> bool:
    """Connect to Ray; True when this process started the Ray instance (and owns it)."""
    import ray

    if address.startswith("ray://"):
        # Ray Client cannot stream from Serve deployment handles (Ray 2.55).
        raise ValueError(  # the CLI prints it as one "error:" line, exit status 2
            "--ray ray://... (Ray Client) cannot stream tokens from Serve; run `adapterhub "
            "serve --ray` on a Ray node (address host:6379 or auto), or serve the API inside "
            "the application (build_app argument grpc_port)")
    if ray.is_initialized():
        return False
    if address == LOCAL:
        ray.init(include_dashboard=False)
        return True
    ray.init(address=address)
    return False


def _running(app: str) -> bool:
    from ray import serve

    try:
        status = serve.status()
    except Exception:  # noqa: BLE001 - no Serve instance in this cluster yet
        return False
    found = status.applications.get(app)
    return found is not None and str(found.status) in ("RUNNING", "DEPLOYING",
                                                       "ApplicationStatus.RUNNING",
                                                       "ApplicationStatus.DEPLOYING")


def attach_or_deploy(app: str, args: dict[str, Any]) -> tuple[Any, Any, bool]:
    """(replica handle, directory handle, deployed here) for the application ``app``."""
    from ray import serve

    from serving.cluster.app import DIRECTORY, REPLICA, build_app

    deployed = not _running(app)
    if deployed:
        log.info("deploying Serve application %r (%s replicas)", app, args["num_replicas"])
        serve.start(proxy_location="Disabled")  # our gRPC server is the way in
        serve.run(build_app(args), name=app, route_prefix=None)
    else:
        log.info("attaching to the running Serve application %r", app)
    return (serve.get_deployment_handle(REPLICA, app),
            serve.get_deployment_handle(DIRECTORY, app), deployed)


def build_server(args: Any, config: Any) -> Any:
    """The (not yet started) gRPC Server over the cluster; serving/cli.py's ``build``."""
    from adapterhub import settings
    from serving.cluster.config import ClusterConfig
    from serving.cluster.ingress import build_server as build_cluster_server

    owns_ray = connect(args.ray)
    data_dir = settings.data_dir(args.data_dir)
    engine, directory, deployed = attach_or_deploy(
        args.ray_app, cluster_args(args, config.base_model, data_dir))
    # The application's own settings win: the API must queue jobs where the replicas look.
    app_cfg = ClusterConfig.from_args(directory.config.remote().result(timeout_s=60))
    if args.no_finetune:
        app_cfg.finetune = False
    if args.dataset_root:
        app_cfg.dataset_roots = [str(r) for r in args.dataset_root]

    def teardown() -> None:
        from ray import serve

        if deployed:
            serve.delete(args.ray_app)
        if owns_ray:
            import ray

            ray.shutdown()

    return build_cluster_server(app_cfg, engine, directory, config, on_shutdown=teardown)
