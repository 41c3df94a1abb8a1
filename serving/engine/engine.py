"""The engine loop: requests in, batched steps over the unified pool, tokens out.

``add_request`` and ``abort`` may be called from any thread; they are applied at the next
step boundary, where aborted and expired requests give their pages back before anything
is scheduled. ``step`` is called by one thread (see loop.py for the background driver).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from adapterhub.checkpoints import load_tokenizer, read_base_config
from serving.engine.adapter_cache import AdapterCache
from serving.engine.adapter_store import AdapterStore, HostAdapter
from serving.engine.config import EngineConfig
from serving.engine.errors import AdapterNotFound, InvalidRequest, Overloaded
from serving.engine.outputs import RequestOutput
from serving.engine.pool import UnifiedPool
from serving.engine.runner import ModelRunner
from serving.engine.sampling import SamplingParams
from serving.engine.scheduler import Batch, Scheduler, SchedulerConfig
from serving.engine.sequence import FinishReason, Sequence, Status


class Engine:
    """``resolver`` maps an adapter reference the store lacks (``name@alias``, a registry
    version, a local path) to a local adapter directory; it is loaded on first use."""

    def __init__(self, config: EngineConfig,
                 resolver: Callable[[str], str | Path] | None = None) -> None:
        self.config = config
        self.resolver = resolver
        hf_config = read_base_config(config.model)
        self.tokenizer = load_tokenizer(config.model)
        self.runner = ModelRunner.from_checkpoint(config.model, config.dtype, config.device,
                                                  config.max_num_seqs)
        self.runner.model.pack_weights(config.packed_weights)
        self.runner.lora_worker = config.lora_worker
        self.shape = self.runner.shape
        self.max_model_len = config.max_model_len or hf_config.get(
            "max_position_embeddings", 2048)
        page_elems = self.shape.num_layers * 2 * config.block_size * self.shape.kv_dim
        page_bytes = page_elems * torch.empty((), dtype=config.dtype).element_size()
        num_pages = config.num_pages or max(1, config.pool_bytes // page_bytes)
        self.pool = UnifiedPool(num_pages, self.shape, config.block_size, config.dtype,
                                config.device)
        self.store = AdapterStore()
        # Adapters the runner reads in place from their pages want one run of them.
        self.cache = AdapterCache(self.pool, self.store,
                                  consecutive=self.runner.native is not None)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_batched_tokens,
                            config.watermark_pages),
            self.pool, self.cache,
        )
        self._inbox: deque[tuple[str, object]] = deque()
        self._lock = threading.Lock()
        self._step_lock = threading.Lock()
        self._live: dict[str, Sequence] = {}
        self._pending = 0
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens = 0
        # A coserve.CoServer: fine-tuning jobs trained inside step() (None = inference only).
        self.coserve = None

    # -- adapters ---------------------------------------------------------------------
    def register_adapter(self, name: str, source: str | Path | HostAdapter) -> HostAdapter:
        """Add (or replace) an adapter in the host store; validation errors are raised.

        The store changes at once (new requests see it); pool pages of a replaced or
        removed adapter are dealt with at the next step boundary.
        """
        from serving.engine.adapter_loader import load_host_adapter

        adapter = source if isinstance(source, HostAdapter) else load_host_adapter(
            name, source, self.runner.model, self.config.dtype)
        if adapter.name != name:
            raise ValueError(f"adapter name mismatch: {adapter.name!r} != {name!r}")
        self.store.put(adapter)
        with self._lock:
            self._inbox.append(("refresh_adapter", name))
        return adapter

    def prepare_adapter(self, ref: str) -> None:
        """Make sure ``ref`` is in the host store, resolving and loading it if needed
        (slow: call it outside any lock that token delivery needs)."""
        if ref not in self.store:
            self._resolve(ref)

    def _resolve(self, ref: str) -> None:
        if self.resolver is None:
            raise AdapterNotFound(f"adapter {ref!r} is not registered")
        from adapterhub.errors import RegistryError

        try:
            path = self.resolver(ref)
        except RegistryError as exc:
            raise AdapterNotFound(str(exc)) from None
        self.register_adapter(ref, path)

    def unregister_adapter(self, name: str) -> None:
        if self.store.remove(name) is None:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        with self._lock:
            self._inbox.append(("drop_adapter", name))

    # -- requests ---------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        deadline_s: float | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        try:
            params.validate(self.shape.vocab_size)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        ids = self._encode(prompt)
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"the context length {self.max_model_len}")
        if adapter:
            self.prepare_adapter(adapter)
        need = -(-(len(ids) + params.max_tokens) // self.config.block_size) + (
            self.cache.pages_needed(adapter) if adapter else 0)
        if need + self.config.watermark_pages > self.pool.num_pages:
            raise InvalidRequest(f"request needs {need} pages; the pool has {self.pool.num_pages}")
        if deadline_s is not None and deadline_s <= 0:
            raise InvalidRequest("deadline must be positive")
        with self._lock:
            self.check_capacity()
            seq = Sequence(ids, params, adapter or None,
                           deadline=time.monotonic() + deadline_s if deadline_s else None)
            if request_id:
                seq.request_id = request_id
            if params.seed is not None and params.temperature > 0:
                seq.generator = torch.Generator(device=self.config.device)
                seq.generator.manual_seed(params.seed)
            self._pending += 1
            self._inbox.append(("add", seq))
        if self.coserve is not None:
            self.coserve.wake()  # a step idling on fine-tuning picks the request up at once
        return seq.request_id

    def check_capacity(self) -> None:
        """Raise Overloaded when the bounded queue (not yet scheduled requests) is full;
        callers may check before costly work such as loading an adapter."""
        waiting = self._pending + len(self.scheduler.waiting)
        if waiting >= self.config.max_queue:
            raise Overloaded(f"queue is full ({waiting} requests waiting)")

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt is empty")
            return [self.tokenizer.bos_token_id,
                    *self.tokenizer(prompt, add_special_tokens=False).input_ids]
        if not prompt:
            raise InvalidRequest("prompt is empty")
        if any(not isinstance(t, int) or not 0 <= t < self.shape.vocab_size for t in prompt):
            raise InvalidRequest("prompt token ids must be integers inside the vocabulary")
        return list(prompt)

    # -- the step ---------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self._live or self._inbox) or (
            self.coserve is not None and self.coserve.has_work())

    def _drain(self) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        while True:
            with self._lock:
                if not self._inbox:
                    break
                kind, item = self._inbox.popleft()
            if kind == "add":
                self._pending -= 1
                self._live[item.request_id] = item
                self.scheduler.add(item)
            elif kind == "abort":
                seq = self._live.get(item)
                if seq is not None:
                    outputs.append(self._finish(seq, FinishReason.ABORTED))
            elif kind == "refresh_adapter":
                self.cache.drop(item)  # pinned (in use): reloaded once its requests finish
            elif kind == "drop_adapter":
                for seq in [s for s in self._live.values() if s.adapter == item]:
                    outputs.append(self._finish(seq, FinishReason.ERROR,
                                                f"adapter {item!r} was unloaded"))
                self.cache.drop(item)
        return outputs

    def _expire(self) -> list[RequestOutput]:
        now = time.monotonic()
        late = [s for s in self._live.values() if s.deadline is not None and s.deadline <= now]
        return [self._finish(s, FinishReason.DEADLINE) for s in late]

    def step(self) -> list[RequestOutput]:
        """Run one iteration; only one thread may step an engine."""
        if not self._step_lock.acquire(blocking=False):
            raise RuntimeError("Engine.step() called from two threads at once")
        try:
            return self._step()
        finally:
            self._step_lock.release()

    def _step(self) -> list[RequestOutput]:
        outputs = self._drain() + self._expire()
        batch = self.scheduler.schedule()
        if self.coserve is None:
            return outputs + self._infer(batch)
        # Inference first; fine-tuning slices get what its budget leaves (coserve/).
        iteration = self.coserve.begin(batch)
        # A fine-tuning slice overlapping this forward computes on the spare core: the LoRA
        # worker would take turns with it there (measured: fine-tuning kept 0.33 of its speed
        # under heavy inference, against 0.95 without the worker).
        try:
            return outputs + self._infer(batch, spare_core=not self.coserve.helper_busy())
        finally:
            self.coserve.end(iteration)

    def _infer(self, batch: Batch, spare_core: bool = True) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        if batch.empty:
            return outputs
        sample_seqs = self._sample_seqs(batch)
        tokens = self.runner.execute(batch, sample_seqs, self.pool, self.cache, spare_core)
        self.scheduler.after_step(batch)
        self.steps += 1
        now = time.monotonic()
        for seq, token in zip(sample_seqs, tokens, strict=True):
            outputs.append(self._append(seq, token, now))
        return outputs

    @staticmethod
    def _sample_seqs(batch: Batch) -> list[Sequence]:
        done = [s for s, n in batch.prefills if s.num_cached + n == s.num_tokens]
        return done + batch.decodes

    def _append(self, seq: Sequence, token: int, now: float) -> RequestOutput:
        p = seq.params
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.prompt_tokens += len(seq.prompt_ids)
        if token == self.tokenizer.eos_token_id and not p.ignore_eos:
            return self._finish(seq, FinishReason.EOS)
        seq.output_ids.append(token)
        self.tokens_generated += 1
        if token in p.stop_token_ids:
            return self._finish(seq, FinishReason.STOP, new_ids=[token])
        text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        for stop in p.stop:
            cut = text.find(stop)
            if cut >= 0:
                return self._finish(seq, FinishReason.STOP, text=text[:cut], new_ids=[token])
        if len(seq.output_ids) >= p.max_tokens:
            return self._finish(seq, FinishReason.LENGTH, text=text, new_ids=[token])
        # Hold back a tail that could still become a stop sequence.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        visible = text[: len(text) - hold] if hold else text
        return self._delta(seq, [token], visible)

    def _delta(self, seq: Sequence, new_ids: list[int], visible: str) -> RequestOutput:
        new_text = visible[len(seq.output_text):]
        seq.output_text = visible
        return RequestOutput(seq.request_id, new_ids, new_text, token_ids=list(seq.output_ids),
                             text=visible, prompt_tokens=len(seq.prompt_ids))

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None,
                text: str | None = None, new_ids: list[int] | None = None) -> RequestOutput:
        self.scheduler.remove(seq)
        self._live.pop(seq.request_id, None)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.error = error
        seq.finished_at = time.monotonic()
        if text is None:
            text = self.tokenizer.decode(seq.output_ids, skip_special_tokens=True)
        out = self._delta(seq, new_ids or [], text)
        out.finished, out.finish_reason, out.error = True, reason.value, error
        out.ttft_s = seq.first_token_at - seq.arrival if seq.first_token_at else None
        out.queue_s = seq.scheduled_at - seq.arrival if seq.scheduled_at else None
        out.latency_s = seq.finished_at - seq.arrival
        return out

    # -- convenience ------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        adapters: list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run requests to completion on this thread; results in prompt order."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters or [None] * len(prompts)
        ids = [self.add_request(p, sp, a)
               for p, sp, a in zip(prompts, params_list, adapters, strict=True)]
        final: dict[str, RequestOutput] = {}
        while len(final) < len(ids):
            for out in self.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[i] for i in ids]

    def release_idle_adapters(self) -> int:
        """Evict every unpinned adapter from the pool; returns how many went."""
        n = 0
        while self.cache.evict_one():
            n += 1
        return n

    def stats(self) -> dict:
        pool = self.pool.stats()
        per_adapter: dict[str, dict[str, int]] = {}
        for seq in list(self._live.values()):  # snapshot: the loop thread mutates _live
            key = seq.adapter or ""
            entry = per_adapter.setdefault(key, {"running": 0, "waiting": 0})
            entry["running" if seq.status is Status.RUNNING else "waiting"] += 1
        return {
            "pool": pool.__dict__,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting) + self._pending,
            "adapters_registered": len(self.store),
            "adapters_resident": len(self.cache.resident_names()),
            "adapter_loads": self.cache.loads,
            "adapter_evictions": self.cache.evictions,
            # How adapters reach the LoRA operator, and how many were copied to get there
            # (slot-buffer copies, or pool reads whose pages were not consecutive).
            "lora_path": self.runner.lora_path,
            "packed_weight_bytes": self.runner.model.packed_bytes(),
            "adapter_copies": self.runner.adapter_copies,
            # Token chunks of LoRA deltas computed on the worker thread and on the engine's.
            "lora_worker": (self.runner.worker.stats() if self.runner.worker is not None
                            else None),
            "preemptions": self.scheduler.preemptions,
            "steps": self.steps,
            "tokens_generated": self.tokens_generated,
            "per_adapter": per_adapter,
            "coserve": self.coserve.stats() if self.coserve is not None else None,
        }
