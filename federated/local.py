"""An in-process Grid: every node's ClientApp handler runs in this process, in turn.

For benchmarks and debugging without Ray or a SuperLink: the server loop, the client handler
and the messages are exactly those of a real run; only the transport is a function call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Message, RecordDict

from federated.client_app import handle_train


def set_task_identity() -> None:
    """Flower stamps messages with the running task's identity, which its runtime sets."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("task_id", "run_id", "node_id"):
        setattr(TaskIdentity, attr, 1)


class LocalGrid:
    """``num_nodes`` nodes with ids 1..n holding partitions 0..n-1."""

    def __init__(self, overrides: Mapping[str, Any], num_nodes: int) -> None:
        set_task_identity()
        self.overrides = dict(overrides)
        self.num_nodes = num_nodes

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.num_nodes + 1))

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": node - 1,
                                       "num-partitions": self.num_nodes})
            replies.append(handle_train(msg, ctx, self.overrides))
        return replies
