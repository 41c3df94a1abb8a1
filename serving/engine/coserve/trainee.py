"""One fine-tune job resident in the engine, trained in slices that the engine schedules.

The job's adapter is injected into a transformers skeleton whose base weights are the
engine's own tensors (no copy), and trained exactly as adapterhub's Trainer trains it: the
same data order (``batch_indices``), learning-rate schedule, AdamW, gradient accumulation
and seed. What differs is only when the work runs: a micro-batch is consumed in
sequence-granular slices, each a forward and backward of a few of its sequences, with the
loss scaled by the micro-batch's total supervised tokens, so the accumulated gradient is
the micro-batch's mean loss gradient that the Trainer computes in one go. The optimizer
steps when the last micro-batch of a step is done.

Dropout draws from torch's process-wide generator with the shape of what it is applied to,
so a job with dropout runs whole micro-batches with its own generator state swapped in.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from adapterhub.data import IGNORE_INDEX, Record, collate, encode_example
from adapterhub.train.config import TrainConfig
from adapterhub.train.trainer import adamw, batch_indices, lr_at
from serving.engine.adapter_loader import hf_skeleton
from serving.engine.coserve.worker import NotShareable, RemoteSlices, slice_backward

log = logging.getLogger(__name__)


def trainable_skeleton(model: torch.nn.Module) -> PreTrainedModel:
    """A transformers model over the engine's weights that can run forward and backward."""
    skeleton = hf_skeleton(model)
    device = next(model.parameters()).device
    for name, module in list(skeleton.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            # Non-persistent buffers (RoPE inverse frequencies) are not in the state dict the
            # skeleton was filled from: rebuild their module from the config.
            parent, _, attr = name.rpartition(".")
            try:
                with torch.device(device):
                    fresh = type(module)(config=skeleton.config)
            except TypeError as exc:
                raise TypeError(f"cannot rebuild {name} ({type(module).__name__}) for "
                                f"training: {exc}") from None
            setattr(skeleton.get_submodule(parent) if parent else skeleton, attr, fresh)
    return skeleton


class State(enum.StrEnum):
    RUNNING = "running"
    PAUSED = "paused"  # at a step the job side checkpoints, evaluates or serves
    DONE = "done"
    FAILED = "failed"


class Trainee:
    """Training state of one job; ``run`` is called by one thread at a time (the co-server's).

    Progress goes to ``events`` for the job's own thread: ("step", metrics, step) after every
    optimizer step, ("pause", None, step) when ``pause_at(step)`` asks for one (the job side
    calls ``resume()`` when done), ("done", None, step) and ("error", exception, step).
    """

    def __init__(self, name: str, adapter, tokenizer: PreTrainedTokenizerBase,
                 records: Sequence[Record], config: TrainConfig,
                 pause_at: Callable[[int], bool] | None = None, weight: float = 1.0) -> None:
        if not records:
            raise ValueError("a fine-tune job needs training records")
        self.name = name
        self.adapter = adapter
        self.config = config
        self.weight = weight
        self.pad_id = tokenizer.pad_token_id
        self.examples = [encode_example(tokenizer, r, config.max_length) for r in records]
        self.lengths = [len(ids) for ids, _ in self.examples]
        # Tokens each example's loss is taken over (labels shifted by one, prompt masked).
        self.supervised = [len(labels) - 1 - labels[1:].count(IGNORE_INDEX)
                           for _, labels in self.examples]
        self.device = next(adapter.parameters()).device
        adapter.train()  # the job side's evaluation restores this mode when it is done
        self.optimizer = adamw(adapter.trainable_parameters(), config)
        # The Trainer seeds torch's generator with the job's seed at step 0; this is that
        # generator's state, kept apart from the engine's (resume replaces it).
        self.rng_state = torch.Generator().manual_seed(config.seed).get_state()
        self.uses_rng = float(getattr(adapter.config, "dropout", 0.0)) > 0.0
        self.pause_at = pause_at or (lambda step: False)
        self.events: queue.Queue = queue.Queue()
        self.state = State.RUNNING
        self.step = 0
        # Position inside the current optimizer step.
        self._micro = 0
        self._rows: list[int] | None = None  # example indices of the current micro-batch
        self._cursor = 0
        self._loss_sum = 0.0
        self._step_tokens = 0
        self._step_started: float | None = None
        # Counters the co-server and benchmarks read.
        self.tokens_trained = 0  # real (unpadded) tokens
        self.slices = 0
        self.saved_bytes = 0  # of the last slice run with measure=True
        # Set by the co-server: where slices compute (None = the calling thread).
        self.remote: RemoteSlices | None = None
        self.busy = False
        self.detached = False
        self.removed = threading.Event()

    # -- planning (co-server thread) --------------------------------------------------
    def _micro_rows(self) -> list[int]:
        if self._rows is None:
            self._rows = batch_indices(self.step, self._micro, len(self.examples), self.config)
        return self._rows

    def next_cost(self) -> int:
        """Padded tokens of the smallest slice that can run next."""
        rows = self._micro_rows()
        take = rows if self.uses_rng else rows[self._cursor:self._cursor + 1]
        return len(take) * max(self.lengths[i] for i in take)

    def select(self, limit: int) -> tuple[int, int]:
        """(sequences, padded tokens) of the longest next slice costing at most ``limit``."""
        rows = self._micro_rows()
        if self.uses_rng:
            cost = self.next_cost()
            return (len(rows), cost) if cost <= limit else (0, 0)
        k = width = cost = 0
        for i in rows[self._cursor:]:
            w = max(width, self.lengths[i])
            if (k + 1) * w > limit:
                break
            k, width, cost = k + 1, w, (k + 1) * w
        return k, cost

    # -- the work (co-server or helper thread) ------------------------------------------
    def run(self, k: int, measure: bool = False) -> int:
        """Forward and backward of the next ``k`` sequences; an optimizer step if that ends
        the step. Returns the real tokens trained. With ``measure``, ``saved_bytes`` is
        then what autograd kept for the backward."""
        cfg = self.config
        rows = self._micro_rows()
        if self._micro == 0 and self._cursor == 0:
            self._step_started = time.perf_counter()
            for group in self.optimizer.param_groups:  # the Trainer sets it before micro 0
                group["lr"] = lr_at(self.step, cfg)
        chunk = rows[self._cursor:self._cursor + k]
        batch = collate([self.examples[i] for i in chunk], self.pad_id)
        batch = {key: t.to(self.device) for key, t in batch.items()}
        # The micro-batch's mean over its supervised tokens, split over slices as sums.
        denom = max(1, sum(self.supervised[i] for i in rows))
        divisor = denom * cfg.grad_accum
        if self.remote is not None:
            try:
                ce, self.saved_bytes = self.remote.backward(batch, divisor, measure)
            except NotShareable as exc:
                if self.remote.touched:  # gradients of this step are in the worker's buffers
                    raise
                log.warning("fine-tune job %s: its model cannot be sent to the worker "
                            "process (%s); its slices run on the helper thread", self.name, exc)
                self.remote = None
                ce, self.saved_bytes = self._backward(batch, divisor, measure)
        else:
            ce, self.saved_bytes = self._backward(batch, divisor, measure)
        tokens = int(batch["attention_mask"].sum())
        self._loss_sum += ce / denom
        self._step_tokens += tokens
        self.tokens_trained += tokens
        self.slices += 1
        self._cursor += k
        if self._cursor >= len(rows):
            self._cursor, self._rows = 0, None
            self._micro += 1
            if self._micro == cfg.grad_accum:
                self._optimizer_step()
        return tokens

    def _backward(self, batch: dict[str, torch.Tensor], divisor: float,
                  measure: bool) -> tuple[float, int]:
        if not self.uses_rng:
            return slice_backward(self.adapter, batch, divisor, measure)
        saved = torch.get_rng_state()
        torch.set_rng_state(self.rng_state)
        try:
            return slice_backward(self.adapter, batch, divisor, measure)
        finally:
            self.rng_state = torch.get_rng_state()
            torch.set_rng_state(saved)

    def _optimizer_step(self) -> None:
        cfg = self.config
        if self.remote is not None:
            self.remote.install_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.remote is not None:
            self.remote.clear_grads()
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        metrics = {"loss": self._loss_sum / cfg.grad_accum, "lr": lr_at(self.step, cfg),
                   "tokens_per_s": self._step_tokens / max(elapsed, 1e-9)}
        self.step += 1
        self._micro, self._loss_sum, self._step_tokens = 0, 0.0, 0
        self.events.put(("step", metrics, self.step))
        if self.step >= cfg.steps:
            self.state = State.DONE
            self.events.put(("done", None, self.step))
        elif self.pause_at(self.step):
            self.state = State.PAUSED
            self.events.put(("pause", None, self.step))

    def fail(self, exc: BaseException) -> None:
        self.state = State.FAILED
        self.events.put(("error", exc, self.step))

    def resume(self) -> None:
        """Continue after a pause (the job side's checkpoint or evaluation is done)."""
        if self.state is State.PAUSED:
            self.state = State.RUNNING
