"""One inference request in flight on the cluster, seen by the servicer like a RequestHandle.

A single asyncio loop thread (Pump) consumes every replica stream, so an open request
costs no thread of its own; outputs are handed to the gRPC thread through a queue, which
is what RequestHandle.stream offers the embedded server.

A replica that dies takes its requests with it. One that had not produced a token yet is
sent again (the router has other replicas, or the replacement); one that had streamed
tokens ends with UNAVAILABLE, since a client may already have shown them.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError

from serving.api.status import ApiError
from serving.cluster.messages import Accepted, Refused
from serving.engine.loop import DONE, drain
from serving.engine.outputs import RequestOutput

MAX_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.25
# A replica's death or a deployment between replicas: the request may run elsewhere.
RETRYABLE = (RayActorError, DeploymentUnavailableError)


class Pump:
    """The asyncio loop (in a daemon thread) that drives all replica streams of a backend."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cluster-pump",
                                        daemon=True)
        self._thread.start()

    def spawn(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        if self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class ClusterRequest:
    """``request_id``, ``final``, ``stream``, ``result`` and ``cancel``, like RequestHandle."""

    def __init__(self, pump: Pump, call: Callable[[float | None], Any],
                 deadline_s: float | None) -> None:
        self.request_id = ""
        self.replica = ""
        self.final: RequestOutput | None = None
        self.attempts = 0
        self._pump = pump
        self._call = call  # remaining deadline -> a replica stream
        self._deadline = None if deadline_s is None else time.monotonic() + deadline_s
        self._queue: queue.Queue = queue.Queue()
        self._accepted = threading.Event()
        self._refusal: BaseException | None = None
        self._cancelled = False
        self._future = pump.spawn(self._run())

    # -- the servicer's side ------------------------------------------------------------------
    def wait_accepted(self, timeout: float) -> None:
        """Block until a replica queued the request; raise its refusal or our timeout."""
        if not self._accepted.wait(timeout):
            self.cancel()
            if self._deadline is not None and time.monotonic() >= self._deadline:
                raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed in the queue")
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "no replica accepted the request")
        if self._refusal is not None:
            raise self._refusal

    def stream(self, timeout: float | None = None) -> Iterator[RequestOutput]:
        return drain(self._queue, timeout)

    def result(self, timeout: float | None = None) -> RequestOutput:
        return list(self.stream(timeout))[-1]

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._future.cancel()  # cancels the pump task, from any thread

    # -- the pump's side ----------------------------------------------------------------------
    def _remaining(self) -> float | None:
        return None if self._deadline is None else self._deadline - time.monotonic()

    def _end(self, error: BaseException | None = None) -> None:
        if not self._accepted.is_set():
            self._refusal = error or ApiError(grpc.StatusCode.UNAVAILABLE, "request lost")
            self._accepted.set()
        elif error is not None:
            self._queue.put(error)
        self._queue.put(DONE)

    async def _run(self) -> None:
        delivered = 0
        while True:
            self.attempts += 1
            remaining = self._remaining()
            if remaining is not None and remaining <= 0:
                self._end(ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed"))
                return
            gen = self._call(remaining)
            try:
                async for item in gen:
                    if isinstance(item, Accepted):
                        self.request_id, self.replica = item.request_id, item.replica
                        self._accepted.set()
                    elif isinstance(item, Refused):
                        self._end(ApiError(grpc.StatusCode[item.code], item.message))
                        return
                    else:
                        delivered += 1
                        if item.finished:
                            self.final = item
                        self._queue.put(item)
                self._end()
                return
            except asyncio.CancelledError:
                gen.cancel()  # Serve cancels the replica's stream, which aborts the request
                self._abort()
                return
            except RETRYABLE as exc:
                if delivered == 0 and self.attempts < MAX_ATTEMPTS and not self._cancelled:
                    # The router drops the dead replica within about a second.
                    await asyncio.sleep(RETRY_BACKOFF_S * self.attempts)
                    continue
                where = f"replica {self.replica}" if self.replica else "the replica"
                self._end(ApiError(grpc.StatusCode.UNAVAILABLE,
                                   f"{where} failed after {delivered} outputs "
                                   f"({type(exc).__name__}); retry the request"))
                return
            except Exception as exc:  # noqa: BLE001 - a server fault: INTERNAL at the API
                self._end(exc)
                return

    def _abort(self) -> None:
        # The servicer that cancelled still reads to the end: give it a final output.
        if self.final is None and self._accepted.is_set():
            self.final = RequestOutput(self.request_id, [], "", finished=True,
                                       finish_reason="aborted")
            self._queue.put(self.final)
        self._end(None if self._accepted.is_set() else
                  ApiError(grpc.StatusCode.CANCELLED, "cancelled before a replica took it"))
