"""API keys: loading them, and the interceptor that checks every call against a role.

A key file holds one ``key[:role]`` per line (``#`` comments and blank lines skipped);
``ADAPTERHUB_API_KEYS`` holds the same entries comma-separated. A key without a role is a
``user`` key (inference only); ``admin`` keys may also load adapters and run fine-tunes.
Health checks and reflection stay open so probes and tools work without a key.
"""

from __future__ import annotations

import hmac
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

ENV = "ADAPTERHUB_API_KEYS"
ROLES = ("user", "admin")
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Everything else needs admin: adapter changes, fine-tune jobs and anything unknown.
USER_METHODS = frozenset({
    "/adapterhub.v1.InferenceService/Generate",
    "/adapterhub.v1.InferenceService/GenerateStream",
    "/adapterhub.v1.AdapterService/List",
    "/adapterhub.v1.AdapterService/Get",
})


def parse_keys(entries: Iterable[str], origin: str) -> dict[str, str]:
    keys: dict[str, str] = {}
    for n, raw in enumerate(entries, 1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        key, sep, role = entry.rpartition(":")
        if not sep:
            key, role = entry, "user"
        if role not in ROLES:
            raise ValueError(f"{origin} entry {n}: role must be 'user' or 'admin', got {role!r}")
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"{origin} entry {n}: a key must be non-empty, without spaces")
        keys[key] = role
    return keys


def load_api_keys(path: str | Path | None = None, env: str | None = None) -> dict[str, str]:
    """Keys from a file and from $ADAPTERHUB_API_KEYS (both may be given); key -> role."""
    keys: dict[str, str] = {}
    if path:
        keys.update(parse_keys(Path(path).read_text().splitlines(), str(path)))
    text = os.environ.get(ENV, "") if env is None else env
    if text.strip():
        keys.update(parse_keys(text.split(","), ENV))
    return keys


def _presented(metadata: Iterable[tuple[str, str]]) -> str | None:
    for key, value in metadata:
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
        if key == "x-api-key":
            return value.strip()
    return None


def _denied(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
            ) -> grpc.RpcMethodHandler:
    # Answer with the same handler kind, so streaming clients read a proper status.
    def unary(request, context):
        context.abort(code, message)

    def streaming(request, context):
        context.abort(code, message)
        yield  # pragma: no cover - makes this a generator

    kw = {"request_deserializer": handler.request_deserializer,
          "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(lambda it, ctx: streaming(None, ctx), **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


class ApiKeyInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: dict[str, str],
                 on_denied: Callable[[str, grpc.StatusCode, float], None] | None = None) -> None:
        self.keys = dict(keys)
        self.on_denied = on_denied  # (method, code, started) -> None: access log, metrics

    def role_of(self, presented: str | None) -> str | None:
        if presented is None:
            return None
        role = None
        for key, r in self.keys.items():  # compare against every key: no early-exit timing
            if hmac.compare_digest(key.encode(), presented.encode()):
                role = r
        return role

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        started = time.monotonic()
        role = self.role_of(_presented(handler_call_details.invocation_metadata or ()))
        if role is None:
            code, message = grpc.StatusCode.UNAUTHENTICATED, (
                "missing or unknown API key (send 'authorization: Bearer <key>' or "
                "'x-api-key: <key>')")
        elif role != "admin" and method not in USER_METHODS:
            code, message = grpc.StatusCode.PERMISSION_DENIED, (
                f"{method.rsplit('/', 1)[-1]} needs an admin key")
        else:
            return handler
        if self.on_denied is not None:
            self.on_denied(method, code, started)
        return _denied(handler, code, message)
