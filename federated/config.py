"""The run config of a federated run: Flower's flat ``key = value`` table, typed.

The same keys live in ``federated/pyproject.toml`` under ``[tool.flwr.app.config]`` (what
``flwr run`` reads and ``--run-config`` overrides); from Python, pass a dict of overrides to
``federated.server_app.make_server_app`` / ``federated.client_app.make_client_app``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from adapterhub.methods import make_config
from adapterhub.methods.configs import AdapterConfig
from adapterhub.train import TrainConfig
from federated.strategies import DEFAULT_REG, check_supported
from federated.validation import DEFAULT_MAX_NORM


@dataclasses.dataclass
class FedConfig:
    base_model: str = ""  # "" = the shipped base model
    task: str = "caesar"  # shipped task: data of simulated clients and the server's eval set
    method: str = "lora"
    method_params: str = '{"r": 8, "alpha": 16}'  # JSON, the method's hyperparameters
    strategy: str = "fedit"
    num_rounds: int = 3
    local_steps: int = 20
    batch_size: int = 16
    lr: float = 5e-3
    max_length: int = 64
    max_new_tokens: int = 16
    seed: int = 0
    fraction_train: float = 1.0
    min_train_clients: int = 2  # a round aggregates once this many valid updates arrived
    min_available_clients: int = 2
    round_timeout: float = 600.0
    max_update_norm: float = DEFAULT_MAX_NORM
    lora_fair_reg: float = DEFAULT_REG
    partition_alpha: float = 0.5  # Dirichlet concentration of the non-IID split
    partition_size: int = 0  # records per simulated client (0 = all of its share)
    client_eval_limit: int = 32
    eval_limit: int = 100  # server-side held-out records scored each round (0 = skip)
    eval_every: int = 1  # server eval every N rounds and at the end; 0 = at the end only
    data_dir: str = ""  # AdapterHub data dir (MLflow store); "" = $ADAPTERHUB_HOME
    experiment: str = "federated"
    adapter_name: str = "federated-adapter"
    serve_address: str = ""  # a running AdapterHub server to hot-load the final adapter into
    checkpoint_dir: str = ""  # global adapter per round, for resume; "" = <data_dir>/federated

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FedConfig:
        """Build from Flower's run config (hyphenated keys); unknown keys are an error."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown run config key {key!r}")
            default = names[name].default
            # TOML and --run-config give ints where floats are meant; the reverse is a typo.
            kwargs[name] = float(value) if isinstance(default, float) else value
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check_supported(self.strategy, self.method)
        self.adapter_config()
        if self.min_train_clients < 1 or self.min_available_clients < self.min_train_clients:
            raise ValueError("need 1 <= min-train-clients <= min-available-clients")
        if not 0 < self.fraction_train <= 1:
            raise ValueError("fraction-train must be in (0, 1]")

    def params(self) -> dict[str, Any]:
        return json.loads(self.method_params) if self.method_params else {}

    def adapter_config(self) -> AdapterConfig:
        return make_config(self.method, **self.params())

    def train_config(self, server_round: int) -> TrainConfig:
        return TrainConfig(
            steps=self.local_steps, batch_size=self.batch_size, lr=self.lr,
            warmup_steps=min(5, self.local_steps - 1), max_length=self.max_length,
            max_new_tokens=self.max_new_tokens, seed=self.seed + server_round,
            checkpoint_every=0, eval_limit=self.client_eval_limit,
        )

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
