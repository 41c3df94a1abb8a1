"""Settings of the cluster application: replicas, their resources, engine sizes, shared stores.

One dict (the Serve application's ``args``, e.g. from a RayService's serveConfigV2) becomes
a ClusterConfig; unknown keys fail at build time with the list of known ones, so a typo in
a Helm value does not silently fall back to a default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ClusterConfig:
    base_model: str | None = None  # checkpoint directory on every node; None = shipped base
    # Shared by the replicas and the API process: data directory (job data, checkpoints,
    # registry cache), job store and MLflow tracking store.
    data_dir: str | None = None
    tracking_uri: str | None = None
    job_store: str | None = None  # default <data_dir>/jobs.db
    num_replicas: int = 2
    num_cpus: float = 1.0  # per replica, fractional allowed
    num_gpus: float = 0.0  # per replica, fractional allowed
    # Adapters one replica advertises to the router (Serve multiplexing, LRU). Sized like the
    # adapters its pool holds, so "routed here" and "resident here" mostly agree.
    max_adapters: int = 64
    # Requests the router may hand one replica at once. The engine batches them itself, so
    # this is high: a low cap makes the router spill an adapter's requests to other replicas.
    max_ongoing_requests: int = 256
    # A request spills from its adapter's replica to the least loaded one only when the
    # former has this many more requests in flight (the adapter is then held by both).
    affinity_imbalance: int = 12
    device: str | None = None  # default: cuda when num_gpus > 0, else cpu
    dtype: str = "float32"
    pool_mb: int = 256
    num_pages: int | None = None  # overrides pool_mb (tests size pools in pages)
    block_size: int = 16
    max_queue: int = 4096
    max_batched_tokens: int = 512
    max_num_seqs: int = 64
    allow_path_refs: bool = False
    finetune: bool = True  # replicas take fine-tune jobs from the shared job store
    jobs_per_replica: int = 2  # fine-tune jobs one replica runs at once
    # Co-serving (serving/engine/coserve): jobs train inside the replica's engine iterations
    # (overlap | inline), or "off" for a dedicated copy of the base model per job.
    coserve: str = "overlap"
    coserve_min_share: float = 0.05
    coserve_ttft_slo_ms: float | None = None
    coserve_tpot_slo_ms: float | None = None
    dataset_roots: list[str] | None = None
    report_interval_s: float = 0.5  # replica -> directory snapshots
    job_poll_s: float = 1.0  # how often an idle replica looks for queued or orphaned jobs
    health_check_period_s: float = 2.0
    env_vars: dict[str, str] | None = None  # extra environment of the replica processes
    # The gRPC API inside the application (ingress.py); None = served from outside by
    # `adapterhub serve --ray`. Non-loopback hosts need an API key file.
    grpc_port: int | None = None
    grpc_host: str = "127.0.0.1"
    api_keys_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    ingress_on_head: bool = True  # where a Kubernetes service (the head's) can reach it

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> ClusterConfig:
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"unknown cluster argument(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")
        # YAML and CLI give "" for "not set"; treat it like a missing key.
        cfg = cls(**{k: v for k, v in args.items() if v is not None and v != ""})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if int(self.num_replicas) < 1:
            raise ValueError(f"num_replicas must be at least 1, got {self.num_replicas}")
        if float(self.num_cpus) < 0 or float(self.num_gpus) < 0:
            raise ValueError("num_cpus and num_gpus must not be negative")
        if int(self.max_adapters) < 1:
            raise ValueError(f"max_adapters must be at least 1, got {self.max_adapters}")
        if int(self.max_ongoing_requests) < 1:
            raise ValueError("max_ongoing_requests must be at least 1")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.coserve not in ("overlap", "inline", "off"):
            raise ValueError(f"coserve must be overlap, inline or off, got {self.coserve!r}")
        if int(self.jobs_per_replica) < 1:
            raise ValueError("jobs_per_replica must be at least 1")
        if self.report_interval_s <= 0 or self.job_poll_s <= 0:
            raise ValueError("report_interval_s and job_poll_s must be positive")

    # -- resolved values (filled in on the node that reads them) ----------------------------
    def model_path(self) -> str:
        if self.base_model:
            return str(Path(self.base_model).expanduser())
        from adapterhub.basemodel import default_base_path

        return str(default_base_path())

    def resolved_data_dir(self) -> Path:
        from adapterhub import settings

        return settings.data_dir(self.data_dir)

    def resolved_tracking_uri(self) -> str:
        from adapterhub import settings

        return self.tracking_uri or settings.tracking_uri(self.resolved_data_dir())

    def job_store_path(self) -> Path:
        return Path(self.job_store) if self.job_store else self.resolved_data_dir() / "jobs.db"

    def resolved_device(self) -> str:
        return self.device or ("cuda" if float(self.num_gpus) > 0 else "cpu")

    def to_args(self) -> dict[str, Any]:
        return asdict(self)
