"""Drives an Engine from a background thread and delivers outputs to sync and async callers.

Each request gets a handle whose outputs can be iterated from a thread (``stream``) or from
asyncio (``astream``); cancelling a handle aborts the request, which frees its pages at
the next step boundary.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from serving.engine.engine import Engine
from serving.engine.outputs import RequestOutput
from serving.engine.sampling import SamplingParams

DONE = object()


def drain(q: queue.Queue, timeout: float | None = None) -> Iterator[RequestOutput]:
    """Outputs from ``q`` until the ``DONE`` marker; an exception put on it is raised."""
    while True:
        item = q.get(timeout=timeout)
        if item is DONE:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


class RequestHandle:
    def __init__(self, loop: EngineLoop, request_id: str) -> None:
        self.loop = loop
        self.request_id = request_id
        self._queue: queue.Queue = queue.Queue()
        self._async: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self.final: RequestOutput | None = None

    def _deliver(self, item: object) -> None:
        self._queue.put(item)
        for entry in list(self._async):
            aloop, aqueue = entry
            try:
                aloop.call_soon_threadsafe(aqueue.put_nowait, item)
            except RuntimeError:  # its event loop closed: nobody is reading that stream
                self._async.remove(entry)

    def stream(self, timeout: float | None = None) -> Iterator[RequestOutput]:
        return drain(self._queue, timeout)

    async def astream(self) -> AsyncIterator[RequestOutput]:
        aqueue: asyncio.Queue = asyncio.Queue()
        # Replay what already arrived on the thread queue, then follow live deliveries.
        with self.loop._lock:
            while True:
                try:
                    aqueue.put_nowait(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._async.append((asyncio.get_running_loop(), aqueue))
        try:
            while True:
                item = await aqueue.get()
                if item is DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if self.final is None:
                self.cancel()

    def result(self, timeout: float | None = None) -> RequestOutput:
        outputs = list(self.stream(timeout))
        return outputs[-1]

    def cancel(self) -> None:
        self.loop.engine.abort(self.request_id)


class EngineLoop:
    """Owns the thread that calls ``engine.step()`` while there is work."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.05) -> None:
        if getattr(engine, "_loop", None) is not None and engine._loop._thread.is_alive():
            raise RuntimeError("this engine is already driven by an EngineLoop")
        engine._loop = self
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.error: BaseException | None = None
        self._thread.start()

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None,
               adapter: str | None = None, deadline_s: float | None = None) -> RequestHandle:
        """Validate and enqueue; raises the engine's request errors synchronously."""
        if adapter:
            self.engine.prepare_adapter(adapter)  # may load from the registry: not under lock
        with self._lock:
            rid = self.engine.add_request(prompt, params, adapter, deadline_s)
            handle = RequestHandle(self, rid)
            self._handles[rid] = handle
        self._wake.set()
        return handle

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # a bug must not leave callers waiting forever
                self.error = exc
                self._fail_all(exc)
                continue
            with self._lock:
                for out in outputs:
                    handle = self._handles.get(out.request_id)
                    if handle is None:
                        continue
                    try:
                        handle._deliver(out)
                        if out.finished:
                            handle.final = out
                            handle._deliver(DONE)
                            del self._handles[out.request_id]
                    except Exception:  # one consumer's failure must not stop the engine thread
                        self._handles.pop(out.request_id, None)
                        self.engine.abort(out.request_id)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            handles, self._handles = self._handles, {}
        for rid, handle in handles.items():
            self.engine.abort(rid)
            handle._deliver(exc if isinstance(exc, RuntimeError)
                            else RuntimeError(f"engine step failed: {exc}"))
            handle._deliver(DONE)

    def run_in_loop(self, fn, *args):
        """Run ``fn`` under the submit lock (for adapter changes from API threads)."""
        with self._lock:
            return fn(*args)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop stepping; requests still in flight end with an error, nobody waits forever."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self._fail_all(RuntimeError("the engine is shutting down"))
        while self.engine.has_unfinished() and not self._thread.is_alive():
            self.engine.step()  # apply the aborts so every page is returned
        if not self._thread.is_alive():
            self.engine.runner.close()  # the LoRA worker thread, if any
