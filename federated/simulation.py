"""Run a federation in Flower's simulation engine from Python (tests, the benchmark).

Ray is started small and on loopback (2 CPUs, no dashboard, 200 MiB object store); each
virtual SuperNode gets partition ``i`` of ``num_clients`` of the shipped task.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from federated.client_app import make_client_app
from federated.rounds import Summary
from federated.server_app import make_server_app

RAY_INIT = {"num_cpus": 2, "include_dashboard": False, "object_store_memory": 200 * 1024**2}


def simulate(overrides: Mapping[str, Any], num_clients: int,
             cpus_per_client: float = 1.0) -> Summary:
    """Run the federation with ``num_clients`` virtual nodes; return the server's Summary."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results: list[Summary] = []
    run_simulation(
        server_app=make_server_app(overrides, results),
        client_app=make_client_app(overrides),
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                        "init_args": RAY_INIT},
    )
    if not results:
        raise RuntimeError("the simulated federation ended without a result (see the log)")
    return results[0]
