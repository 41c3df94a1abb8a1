"""The Flower ServerApp: runs ``federated.rounds.run_federation`` with the run config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from federated.config import FedConfig
from federated.rounds import Summary, run_federation


def make_server_app(
    overrides: Mapping[str, Any] | None = None, results: list[Summary] | None = None,
) -> ServerApp:
    """A ServerApp whose run config is ``overrides`` over ``flwr run``'s; the run's Summary
    is appended to ``results`` when given (Python callers read it after run_simulation)."""
    server = ServerApp()
    fixed = dict(overrides or {})

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = FedConfig.from_run_config({**context.run_config, **fixed})
        summary = run_federation(grid, cfg)
        if results is not None:
            results.append(summary)

    return server


app = make_server_app()
