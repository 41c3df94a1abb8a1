"""The Flower ClientApp: train the adapter on this node's data, reply with adapter tensors only.

Data: ``data-path`` in the node config (a data owner's JSONL file, see the README), else the
simulated non-IID share ``partition-id`` of ``num-partitions`` of the shipped task.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from federated.config import FedConfig
from federated.data import client_records
from federated.messages import ARRAYS, CONFIG, failure_content, from_record, reply_content

log = logging.getLogger(__name__)


def handle_train(msg: Message, context: Context, overrides: Mapping[str, Any]) -> Message:
    """Train one round; any failure becomes a ``failed`` reply, never a hung round."""
    try:
        cfg = FedConfig.from_run_config({**context.run_config, **overrides})
        node = context.node_config
        train, held_out = client_records(
            cfg.task, int(node.get("num-partitions", 1)), int(node.get("partition-id", 0)),
            cfg.partition_alpha, cfg.seed, cfg.partition_size, str(node.get("data-path", "")),
        )
        server_round = int(msg.content[CONFIG]["server-round"])
        from federated import task  # torch and transformers load only where training runs

        update, metrics = task.local_train(
            cfg, from_record(msg.content[ARRAYS]), train, held_out[: cfg.client_eval_limit],
            server_round,
        )
        return Message(reply_content(update, metrics), reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - reported to the server, which logs and goes on
        log.error("local training failed: %s", traceback.format_exc())
        return Message(failure_content(f"{type(exc).__name__}: {exc}"), reply_to=msg)


def make_client_app(overrides: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp whose run config is ``overrides`` over the one from ``flwr run``."""
    client = ClientApp()
    fixed = dict(overrides or {})

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, fixed)

    return client


app = make_client_app()
