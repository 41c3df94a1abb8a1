"""The server's round loop as a plain function of a Grid and a FedConfig.

Per round: sample nodes, send the global state, collect replies within the timeout (nodes
that drop simply do not answer), reject invalid updates, aggregate once at least
``min-train-clients`` valid updates arrived (else keep the global state), evaluate, log to
MLflow and checkpoint. At the end: register the final adapter and optionally push it to a
running AdapterHub server. Works with any object offering ``get_node_ids`` and
``send_and_receive`` (tests drive it with an in-process grid).
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Message, MessageType

from adapterhub import settings
from adapterhub.data import read_jsonl
from adapterhub.tasks import task_path
from federated import checkpoint, task, tracking
from federated.config import FedConfig
from federated.messages import read_reply, train_content
from federated.strategies import aggregate, stack_flat
from federated.strategies.base import Arrays, weighted_mean
from federated.validation import UpdateRejected, validate_update

log = logging.getLogger(__name__)


class GridLike(Protocol):
    def get_node_ids(self) -> Any: ...
    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Any: ...


@dataclass
class Summary:
    rounds: list[dict[str, float]] = field(default_factory=list)
    arrays: Arrays = field(default_factory=dict)
    run_id: str = ""
    registered: str = ""  # "NAME/VERSION"
    resumed_from: int = 0
    initial_eval: dict[str, float] = field(default_factory=dict)  # round 0: the base's score


def fingerprint(cfg: FedConfig) -> dict:
    """What a checkpoint must share with the config to be resumed."""
    keys = ("base_model", "task", "method", "method_params", "strategy", "seed", "adapter_name")
    return {k: getattr(cfg, k) for k in keys}


def checkpoint_dir(cfg: FedConfig) -> Path:
    if cfg.checkpoint_dir:
        return Path(cfg.checkpoint_dir)
    return settings.data_dir(cfg.data_dir or None) / "federated" / cfg.adapter_name


def update_shapes(cfg: FedConfig) -> dict[str, tuple[int, ...]]:
    """Shapes every client update must have: those of a freshly seeded client adapter."""
    model, _ = task.fresh_base(cfg)
    adapter = task.seeded_adapter(model, cfg, cfg.seed)
    live = task.to_numpy(adapter.adapter_state_dict(), task.sent_keys(adapter, cfg.strategy))
    return {k: tuple(v.shape) for k, v in live.items()}


def next_global(cfg: FedConfig, previous: Arrays, updates: list[Arrays],
                weights: list[float]) -> Arrays:
    merged = aggregate(cfg.strategy, updates, weights, cfg.lora_fair_reg)
    return stack_flat(previous, merged) if cfg.strategy == "flora" else merged


def sample(grid: GridLike, cfg: FedConfig) -> list[int]:
    """Wait (up to the round timeout) for enough nodes, then sample a fraction of them."""
    deadline = time.monotonic() + cfg.round_timeout
    while len(nodes := sorted(grid.get_node_ids())) < cfg.min_available_clients:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} node(s) connected, "
                               f"{cfg.min_available_clients} required")
        time.sleep(1.0)
    size = max(cfg.min_train_clients, int(len(nodes) * cfg.fraction_train))
    return sorted(random.Random(cfg.seed).sample(nodes, min(size, len(nodes))))


def _mean(values: list[float], weights: list[float]) -> float:
    return float(weighted_mean([np.float64(v) for v in values], weights))


def play_round(grid: GridLike, cfg: FedConfig, arrays: Arrays, server_round: int,
               shapes: dict[str, tuple[int, ...]]) -> tuple[Arrays, dict[str, float]]:
    """One round; returns the new global state and the round's metrics."""
    t0 = time.perf_counter()
    nodes = sample(grid, cfg)
    content = train_content(arrays, server_round)
    down = content.array_records["arrays"].count_bytes()
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.TRAIN,
                        group_id=str(server_round)) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    updates, weights, metrics, failed, rejected, up = [], [], [], 0, 0, 0
    for reply in replies:
        update, client_metrics, error = read_reply(reply)
        if update is None:
            failed += 1
            log.warning("round %d: node %s: %s", server_round, reply.metadata.src_node_id, error)
            continue
        up += reply.content.array_records["arrays"].count_bytes()
        try:
            validate_update(update, shapes, cfg.max_update_norm)
            weight = float(client_metrics.get("num-examples", 1.0))
            if not weight > 0:
                raise UpdateRejected(f"num-examples must be positive, got {weight}")
        except UpdateRejected as exc:
            rejected += 1
            log.warning("round %d: rejected the update of node %s: %s", server_round,
                        reply.metadata.src_node_id, exc)
            continue
        updates.append(update)
        weights.append(weight)
        metrics.append(client_metrics)
    out = {
        "clients_sampled": float(len(nodes)), "clients": float(len(updates)),
        "clients_dropped": float(len(nodes) - len(replies)), "clients_failed": float(failed),
        "clients_rejected": float(rejected), "bytes_down": float(down * len(nodes)),
        "bytes_up": float(up), "aggregated": 0.0,
    }
    if len(updates) >= cfg.min_train_clients:
        arrays = next_global(cfg, arrays, updates, weights)
        out["aggregated"] = 1.0
        for key in ("train_loss", "eval_loss", "exact_match"):
            pairs = [(m[key], w) for m, w in zip(metrics, weights, strict=True) if key in m]
            if pairs:
                out[key] = _mean([v for v, _ in pairs], [w for _, w in pairs])
    else:
        log.warning("round %d: %d valid update(s) < min-train-clients %d; global unchanged",
                    server_round, len(updates), cfg.min_train_clients)
    out["round_seconds"] = time.perf_counter() - t0
    return arrays, out


def server_eval(cfg: FedConfig, arrays: Arrays) -> dict[str, float]:
    if not cfg.eval_limit or not cfg.task:
        return {}
    records = read_jsonl(task_path(cfg.task, "eval"))[: cfg.eval_limit]
    result = task.evaluate_global(cfg, arrays, records)
    return {f"global_{k}": v for k, v in result.items()}


def run_federation(grid: GridLike, cfg: FedConfig) -> Summary:
    """The whole run, resuming from the checkpoint of an interrupted run with the same setup."""
    ckpt_dir = checkpoint_dir(cfg)
    fp = fingerprint(cfg)
    summary = Summary()
    resumed = checkpoint.load(ckpt_dir, fp)
    if resumed is not None:
        arrays, state = resumed
        summary.resumed_from = state.round
        log.info("resuming %s from round %d", cfg.adapter_name, state.round)
    else:
        arrays, state = task.initial_global(cfg), checkpoint.RunState(fingerprint=fp)
    shapes = update_shapes(cfg)
    _, run = tracking.open_run(cfg, state.run_id)
    state.run_id = summary.run_id = run.run_id
    with run:
        if state.round == 0 and cfg.eval_every:
            summary.initial_eval = server_eval(cfg, arrays)
            run.log_metrics(summary.initial_eval, step=0)
        for rnd in range(state.round + 1, cfg.num_rounds + 1):
            arrays, metrics = play_round(grid, cfg, arrays, rnd, shapes)
            if rnd == cfg.num_rounds or (cfg.eval_every and rnd % cfg.eval_every == 0):
                metrics.update(server_eval(cfg, arrays))
            run.log_metrics(metrics, step=rnd)
            summary.rounds.append({"round": float(rnd), **metrics})
            state.round = rnd
            checkpoint.save(ckpt_dir, arrays, state)
        summary.arrays = arrays
        if arrays:
            with tempfile.TemporaryDirectory() as tmp:
                adapter_dir = task.save_global(cfg, arrays, Path(tmp) / cfg.adapter_name)
                version = tracking.register_final(run, cfg, adapter_dir)
            summary.registered = f"{version.name}/{version.version}"
            if cfg.serve_address:
                tracking.push_to_server(cfg.serve_address, summary.registered, cfg.adapter_name)
        state.finished = True
        checkpoint.save(ckpt_dir, arrays, state)
    return summary
