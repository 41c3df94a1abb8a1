"""A process that runs the forward and backward of co-served fine-tuning slices (CPU).

Why a process: on CPU, the helper thread's autograd and the engine's step are both
Python-heavy, and two threads of one interpreter take turns on the GIL. Measured with
bench/coserve.py's quick model, a Trainer loop in a second process kept its full rate
beside inference at 0.6 of saturation with inference latency unchanged, where the helper
thread kept 0.3-0.6 of it and made latency 1.3-1.6x.

Nothing is copied. The co-server moves the engine's base weights to shared memory once,
in place, before it serves (``share_in_place``). A job's model is sent to the worker once;
that moves its adapter parameters to shared memory too, so the worker reads the weights
that the optimizer updates in the engine process. Gradients come back summed in shared
buffers. The data order, optimizer, checkpoints and pauses of the job stay in the engine
process (trainee.py); the worker only computes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from adapterhub.data import IGNORE_INDEX
from serving.engine.coserve.memory import SavedBytes

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
STOP_TIMEOUT_S = 10.0
NICE = 10


def _source_version() -> str:
    # The code this process imported. A worker (re)spawned after the installed files changed
    # under a running engine imports the new code, whose requests and replies need not match.
    import hashlib
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


PROTOCOL = _source_version()


class WorkerDied(RuntimeError):
    """The worker process exited; the slice it was running is lost."""


class NotShareable(RuntimeError):
    """A job's model cannot be sent to the worker (it does not pickle)."""


def unshared_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s tensors that are not in shared memory yet."""
    seen: dict[int, int] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        storage = t.untyped_storage()
        if t.device.type == "cpu" and not storage.is_shared():
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def shm_room() -> int | None:
    """Free bytes of the shared-memory filesystem (None where there is none to ask)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def share_in_place(module: nn.Module) -> None:
    """Move ``module``'s CPU tensors to shared memory; every view of them follows.

    Not thread-safe against readers of those tensors: it swaps their memory.
    """
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.device.type == "cpu":
            t.untyped_storage().share_memory_()


def slice_backward(model: nn.Module, batch: dict[str, torch.Tensor], divisor: float,
                   measure: bool = False) -> tuple[float, int]:
    """Forward and backward of one slice, its loss summed over supervised tokens and
    divided by ``divisor``; gradients accumulate into the parameters' ``grad``.
    Returns the summed cross-entropy and, with ``measure``, the bytes autograd kept for
    the backward (else 0)."""
    counter = SavedBytes(SavedBytes.storages(model)) if measure else None
    with counter or contextlib.nullcontext():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    use_cache=False)
        labels = batch["labels"][:, 1:]
        logits = out.logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="sum")
        (ce / divisor).backward()
    return float(ce.detach()), counter.total if counter else 0


# -- the worker process ----------------------------------------------------------------------
def _serve(conn, threads: int, protocol: str = PROTOCOL) -> None:
    if protocol != PROTOCOL:  # answer every request with why, rather than misread them
        stale = (f"the fine-tuning worker's code ({PROTOCOL}) differs from the engine's "
                 f"({protocol}): the installed files changed under a running server; "
                 "restart it")
        log.error(stale)
        while True:
            try:
                op, *_ = conn.recv()
            except (EOFError, OSError):
                return
            if op == "stop":
                return
            conn.send(("error", stale))
    torch.set_num_threads(threads)
    # Inference first: where the worker and the engine's threads want the same core, the
    # scheduler gives it to the engine (fine-tuning takes the compute inference leaves).
    os.nice(NICE)
    # What unpickling a job's model needs, imported before the first job asks.
    import transformers  # noqa: F401

    import adapterhub.methods  # noqa: F401
    jobs: dict[int, tuple[nn.Module, list[nn.Parameter], list[torch.Tensor]]] = {}
    while True:
        try:
            op, key, *args = conn.recv()
        except (EOFError, OSError):  # the engine process is gone
            return
        if op == "stop":
            return
        try:
            if op == "attach":
                model, names, grads = args
                params = dict(model.named_parameters())
                jobs[key] = (model, [params[n] for n in names], grads)
                reply = None
            elif op == "detach":
                jobs.pop(key, None)
                reply = None
            elif op == "jobs":
                reply = len(jobs)
            else:
                reply = _run(*jobs[key], *args)
            conn.send(("ok", reply))
        except Exception as exc:  # the job fails in the engine process, the worker goes on
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _run(model: nn.Module, params: list[nn.Parameter], grads: list[torch.Tensor],
         batch: dict, divisor: float, measure: bool) -> tuple[float, list[int], int, float]:
    t0 = time.perf_counter()
    batch = {k: torch.from_numpy(v) for k, v in batch.items()}
    ce, saved = slice_backward(model, batch, divisor, measure)
    touched = []
    for i, (p, g) in enumerate(zip(params, grads, strict=True)):
        if p.grad is not None:
            g.add_(p.grad)
            p.grad = None
            touched.append(i)
    return ce, touched, saved, time.perf_counter() - t0


# -- the engine process's side -----------------------------------------------------------------
class SliceWorker:
    """Handle of one worker process; requests from any thread, one at a time.

    One per engine process (``shared``): starting one imports torch and transformers
    (seconds), and co-servers come and go (benchmarks make one per side); multiprocessing
    stops it when the engine process exits, and it exits when the engine process dies.
    """

    _shared: SliceWorker | None = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> SliceWorker:
        with cls._shared_lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or torch.get_num_threads()
        self.generation = 0  # bumped at every (re)start: jobs attached before must resend
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def ensure_started(self) -> None:
        """Start the process if it is not running (returns at once; it imports meanwhile)."""
        with self._lock:
            if self.alive():
                return
            if self._proc is not None:
                log.warning("fine-tuning worker exited (code %s); starting a new one",
                            self._proc.exitcode)
            ctx = mp.get_context("spawn")  # fork would copy the engine's threads' locks
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(target=_serve, args=(child, self.threads, PROTOCOL),
                                     daemon=True, name="adapterhub-finetune-worker")
            self._proc.start()
            child.close()
            self.generation += 1
            log.info("co-serving: fine-tuning slices compute in worker process %d "
                     "(%d threads)", self._proc.pid, self.threads)

    def call(self, op: str, key: int, *args):
        with self._lock:
            if self._proc is None:
                raise WorkerDied("the fine-tuning worker was not started")
            try:
                # Pickling happens before any byte is written: a failure leaves the pipe clean.
                payload = ForkingPickler.dumps((op, key, *args))
            except Exception as exc:
                raise NotShareable(f"{type(exc).__name__}: {exc}") from exc
            try:
                self._conn.send_bytes(payload)
                status, reply = self._conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                self._proc.join(1.0)
                raise WorkerDied(f"the fine-tuning worker process exited (code "
                                 f"{self._proc.exitcode}) during a slice") from None
        if status == "error":
            raise RuntimeError(f"fine-tuning slice failed in the worker: {reply}")
        return reply

    def jobs(self) -> int:
        """How many jobs' models the worker holds."""
        return self.call("jobs", -1)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        with self._lock:
            proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
            if proc is None:
                return
            try:
                conn.send(("stop", 0))
            except (OSError, BrokenPipeError):
                pass
            proc.join(STOP_TIMEOUT_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()


class RemoteSlices:
    """One job's forward and backward in the worker; its gradients summed in shared
    buffers until the optimizer step installs them (only those a slice produced, so a
    parameter without a gradient is skipped as the Trainer's optimizer skips it)."""

    _keys = itertools.count()

    def __init__(self, worker: SliceWorker, model: nn.Module) -> None:
        self.worker = worker
        self.key = next(self._keys)
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.grads = [torch.zeros_like(p).share_memory_() for p in self.params]
        self.touched: set[int] = set()
        self.compute_s = 0.0  # the worker's time in this job's slices
        self._generation: int | None = None

    def backward(self, batch: dict[str, torch.Tensor], divisor: float,
                 measure: bool) -> tuple[float, int]:
        """(summed cross-entropy, bytes saved for backward if ``measure`` else 0)."""
        if self._generation != self.worker.generation:
            # Sending the model moves its tensors to shared memory (in place). NotShareable
            # leaves nothing behind: the caller may compute this slice itself.
            self.worker.call("attach", self.key, self.model, self.names, self.grads)
            self._generation = self.worker.generation
        ce, touched, saved, seconds = self.worker.call(
            "run", self.key, {k: v.numpy() for k, v in batch.items()}, divisor, measure)
        self.touched.update(touched)
        self.compute_s += seconds
        return ce, saved

    def install_grads(self) -> None:
        for i in self.touched:
            self.params[i].grad = self.grads[i]

    def clear_grads(self) -> None:
        for i in self.touched:
            self.grads[i].zero_()
        self.touched.clear()

    def release(self) -> None:
        """Drop the worker's copy of the model (the job was detached)."""
        if self._generation == self.worker.generation:
            try:
                self.worker.call("detach", self.key)
            except WorkerDied:
                pass
        self._generation = None
