"""What travels: adapter tensors as Flower ArrayRecords (numpy, never pickled) and metrics.

A train message carries ``arrays`` (the global state) and ``config`` (the round); a reply
carries ``arrays`` (the client update) and ``metrics``, or ``metrics`` with ``failed = 1``
when local training raised, so the server counts a failure instead of waiting for a timeout.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from federated.strategies.base import Arrays

ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


def to_record(arrays: Arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> Arrays:
    # Array.numpy() loads with allow_pickle=False: a malicious payload cannot run code.
    return {k: v.numpy() for k, v in record.items()}


def train_content(arrays: Arrays, server_round: int) -> RecordDict:
    config = ConfigRecord({"server-round": server_round})
    return RecordDict({ARRAYS: to_record(arrays), CONFIG: config})


def reply_content(update: Arrays, metrics: dict[str, float]) -> RecordDict:
    return RecordDict({ARRAYS: to_record(update), METRICS: MetricRecord(metrics)})


def failure_content(reason: str) -> RecordDict:
    return RecordDict({METRICS: MetricRecord({"failed": 1.0}),
                       CONFIG: ConfigRecord({"error": reason[:500]})})


def read_reply(msg: Message) -> tuple[Arrays | None, dict[str, float], str]:
    """(update or None, metrics, error text) of one reply."""
    if msg.has_error():
        return None, {}, f"client error: {msg.error.reason}"
    content = msg.content
    metrics = dict(content[METRICS]) if METRICS in content.metric_records else {}
    if metrics.get("failed"):
        reason = str(content[CONFIG].get("error", "")) if CONFIG in content.config_records else ""
        return None, metrics, f"local training failed: {reason}"
    if ARRAYS not in content.array_records:
        return None, metrics, "reply carries no arrays"
    return from_record(content[ARRAYS]), metrics, ""
