"""InferenceService: Generate (unary) and GenerateStream over the backend.

The client's gRPC deadline becomes the engine request's deadline, and a client that goes
away cancels its engine request, so pool pages come back as soon as nobody waits for them.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator

import grpc

from adapterhub.v1 import inference_pb2, inference_pb2_grpc
from serving.api.backend import LocalBackend
from serving.api.calls import CallTracker, Info, stream, unary
from serving.api.config import ServerConfig
from serving.api.convert import chunk, response, sampling_params
from serving.api.status import ApiError
from serving.engine.loop import RequestHandle
from serving.engine.outputs import RequestOutput

NO_DEADLINE_S = 1e7  # gRPC reports "no deadline" as a far-future remaining time


def follow(handle: RequestHandle, context: grpc.ServicerContext, poll_s: float = 0.2,
           linger_s: float = 5.0) -> Iterator[RequestOutput]:
    """The request's outputs until it finishes; cancels it if the RPC ends first."""
    cancelled_at: float | None = None
    while True:
        try:
            yield from handle.stream(timeout=poll_s)
            return
        except queue.Empty:
            if context.is_active():
                continue
            # The termination callback normally cancelled it already; this covers a
            # callback registered too late, and gives up if the engine loop is gone.
            if cancelled_at is None:
                handle.cancel()
                cancelled_at = time.monotonic()
            elif time.monotonic() - cancelled_at > linger_s:
                raise ApiError(grpc.StatusCode.CANCELLED, "cancelled by the client") from None


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, backend: LocalBackend, calls: CallTracker, config: ServerConfig) -> None:
        self.backend = backend
        self.calls = calls
        self.config = config

    def _submit(self, req: inference_pb2.GenerateRequest, context: grpc.ServicerContext,
                info: Info) -> RequestHandle:
        info["adapter"] = req.adapter[:200]  # client text: keep log lines bounded
        params = sampling_params(req, self.config.max_stop_chars)
        remaining = context.time_remaining()
        deadline_s = remaining if remaining is not None and remaining < NO_DEADLINE_S else None
        if deadline_s is not None and deadline_s <= 0:
            raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before start")
        handle = self.backend.submit(req.prompt, params, req.adapter or None, deadline_s)
        info["request_id"] = handle.request_id

        def on_done() -> None:
            if handle.final is None:
                handle.cancel()

        if not context.add_callback(on_done):  # the RPC already ended
            handle.cancel()
        return handle

    @staticmethod
    def _check_final(out: RequestOutput, context: grpc.ServicerContext, info: Info) -> None:
        info["tokens"] = len(out.token_ids)
        info["finish"] = out.finish_reason
        reason = out.finish_reason
        if reason == "deadline" or (reason == "aborted" and context.time_remaining() <= 0):
            raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"deadline passed after {len(out.token_ids)} tokens")
        if reason == "aborted":
            raise ApiError(grpc.StatusCode.CANCELLED, "request cancelled")
        if reason == "error":
            raise ApiError(grpc.StatusCode.ABORTED, out.error or "request failed")

    @unary("InferenceService/Generate")
    def Generate(self, request, context, info):
        handle = self._submit(request, context, info)
        final = None
        for out in follow(handle, context):
            final = out
        if final is None:  # the stream ended without a final output (loop shut down)
            raise ApiError(grpc.StatusCode.UNAVAILABLE, "engine stopped")
        self._check_final(final, context, info)
        return response(final)

    @stream("InferenceService/GenerateStream")
    def GenerateStream(self, request, context, info):
        handle = self._submit(request, context, info)
        for out in follow(handle, context):
            if out.finished:
                self._check_final(out, context, info)
            yield chunk(out)
