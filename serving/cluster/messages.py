"""What a replica's generate stream carries besides engine outputs.

The first item of every stream is either Accepted (the engine queued the request) or
Refused (a client error with its gRPC status name). Sending the refusal as data rather
than raising keeps the exact status and message: an exception crossing Ray arrives
wrapped in a RayTaskError with the remote traceback in its text.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Accepted:
    request_id: str  # "<replica>/<engine request id>": unique in the cluster, names the replica
    replica: str


@dataclass(frozen=True)
class Refused:
    code: str  # a grpc.StatusCode name, e.g. "NOT_FOUND"
    message: str
