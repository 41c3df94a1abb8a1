"""Per-RPC bookkeeping shared by every servicer: drain gate, status mapping, access log.

Each handler is wrapped once here, so every RPC is counted while in flight (graceful
shutdown waits for them), refused with UNAVAILABLE once draining, answered with a precise
status for any client-caused error, and logged as one JSON line.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from serving.api.status import ApiError, classify

access_log = logging.getLogger("adapterhub.access")
error_log = logging.getLogger("adapterhub.api")

Info = dict[str, Any]  # what a handler reports for its log line: adapter, tokens, ...


class CallTracker:
    def __init__(self, on_status: Callable[[str, str], None] | None = None) -> None:
        self.on_status = on_status  # (method, code name) -> None, e.g. a metrics counter
        self.draining = threading.Event()
        self._inflight = 0
        self._idle = threading.Condition()

    @property
    def inflight(self) -> int:
        return self._inflight

    def drain(self) -> None:
        self.draining.set()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def _enter(self) -> None:
        if self.draining.is_set():
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        with self._idle:
            self._inflight += 1

    def _exit(self) -> None:
        with self._idle:
            self._inflight -= 1
            self._idle.notify_all()

    def record(self, method: str, code: grpc.StatusCode, started: float, info: Info) -> None:
        line = {"method": method, "code": code.name, "latency_s": round(
            time.monotonic() - started, 6), **info}
        access_log.info(json.dumps(line, default=str), extra={"fields": line})
        if self.on_status is not None:
            self.on_status(method, code.name)

    def _fail(self, method: str, exc: BaseException, context: grpc.ServicerContext
              ) -> tuple[grpc.StatusCode, str]:
        known = classify(exc)
        if known is not None:
            return known
        if not context.is_active():
            return grpc.StatusCode.CANCELLED, "cancelled"
        error_log.exception("%s failed", method)
        return grpc.StatusCode.INTERNAL, "internal error (see the server log)"

    def run_unary(self, method: str, tracked: bool, fn: Callable, servicer: Any,
                  request: Any, context: grpc.ServicerContext) -> Any:
        started, info = time.monotonic(), {}
        code, message = grpc.StatusCode.OK, ""
        entered = False
        try:
            if tracked:
                self._enter()
                entered = True
            return fn(servicer, request, context, info)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code, message = self._fail(method, exc, context)
        finally:
            if entered:
                self._exit()
            self.record(method, code, started, info)
        context.abort(code, message)

    def run_stream(self, method: str, tracked: bool, fn: Callable, servicer: Any,
                   request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        started, info = time.monotonic(), {}
        code, message = grpc.StatusCode.OK, ""
        entered = False
        try:
            if tracked:
                self._enter()
                entered = True
            yield from fn(servicer, request, context, info)
        except GeneratorExit:  # gRPC dropped the stream: the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            code, message = self._fail(method, exc, context)
        finally:
            if entered:
                self._exit()
            if code is grpc.StatusCode.OK and not context.is_active():
                code = grpc.StatusCode.CANCELLED
            self.record(method, code, started, info)
        if code is not grpc.StatusCode.OK:
            context.abort(code, message)


def unary(method: str, tracked: bool = True) -> Callable:
    """Wrap ``fn(servicer, request, context, info) -> response``; uses ``servicer.calls``."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def handler(servicer: Any, request: Any, context: grpc.ServicerContext) -> Any:
            return servicer.calls.run_unary(method, tracked, fn, servicer, request, context)

        return handler

    return wrap


def stream(method: str, tracked: bool = True) -> Callable:
    """Wrap a generator ``fn(servicer, request, context, info)``; uses ``servicer.calls``.

    ``tracked=False`` is for endless streams (job watches) that end themselves on drain
    instead of holding shutdown up.
    """

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def handler(servicer: Any, request: Any, context: grpc.ServicerContext
                    ) -> Iterator[Any]:
            yield from servicer.calls.run_stream(method, tracked, fn, servicer, request,
                                                 context)

        return handler

    return wrap
