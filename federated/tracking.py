"""MLflow logging of a federated run through AdapterHub's registry (one run per federation)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adapterhub.registry import Registry, RunLogger
from federated.config import FedConfig

log = logging.getLogger(__name__)


def open_run(cfg: FedConfig, run_id: str = "") -> tuple[Registry, RunLogger]:
    """Resume ``run_id`` when given (server restart), else start a new run with the config."""
    registry = Registry(cfg.data_dir or None)
    if run_id:
        return registry, registry.resume_run(run_id)
    run = registry.start_run(
        cfg.experiment, run_name=f"{cfg.adapter_name}-{cfg.strategy}",
        params=cfg.to_run_config(), tags={"adapterhub.kind": "federated"},
    )
    return registry, run


def register_final(run: RunLogger, cfg: FedConfig, adapter_dir: Path) -> Any:
    """Log the final adapter as the run's artifact and register it as the next version."""
    run.log_adapter(adapter_dir)
    return run.register_adapter(
        cfg.adapter_name, tags={"federated.strategy": cfg.strategy, "federated.rounds":
                                cfg.num_rounds},
    )


def push_to_server(address: str, source: str, name: str) -> None:
    """Hot-load the registered adapter into a running AdapterHub server (AdapterService.Load)."""
    from adapterhub.client import Client

    with Client(address) as client:
        client.load_adapter(source, name)
    log.info("adapter %s loaded into %s as %s", source, address, name)
