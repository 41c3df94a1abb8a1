"""The model runner: turns a scheduled batch into tensors, runs the model, samples.

Per step it builds the attention metadata (slots, block tables) and the LoRA context. On CPU in
float32 or bfloat16, where the native kernel builds, adapters are read in place from their pool
pages (lora_pool.py); elsewhere their weights are copied from the pool into persistent slot
buffers (lora_slots.py) once, when an adapter first needs a slot, for the torch operator
(lora_op.py).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from serving.engine import kernels
from serving.engine.adapter_cache import AdapterCache, Resident
from serving.engine.attention import AttentionMetadata
from serving.engine.layout import TARGET_MODULES
from serving.engine.lora_op import LoraBatchMeta, LoraContext
from serving.engine.lora_pool import AdapterRows, PoolLoraContext, adapter_rows
from serving.engine.lora_slots import LoraSlots
from serving.engine.lora_worker import LoraWorker
from serving.engine.model import LlamaForServing
from serving.engine.pool import UnifiedPool
from serving.engine.sampling import sample
from serving.engine.scheduler import Batch
from serving.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForServing, max_num_seqs: int = 256) -> None:
        self.model = model
        self.shape = model.shape
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.slots = LoraSlots(self.shape, dtype, self.device, max_num_seqs)
        # The LoRA operator picks its per-group path for a typical module width.
        dims = self.shape.module_dims().values()
        self.lora_cost_dim = sum(i + o for i, o in dims) // len(dims)
        probe = torch.empty(1, 1, dtype=dtype, device=self.device)
        self.native = kernels.bgmv_lib() if kernels.bgmv_usable(probe) else None
        self.module_keys = [(layer, m) for layer in range(self.shape.num_layers)
                            for m in TARGET_MODULES]
        self._pool_copies = 0  # pool-read adapters whose pages were not consecutive
        # The pool path's LoRA deltas on a worker thread during the base GEMMs: None = where a
        # core is spare (opened on first use).
        self.lora_worker: bool | None = None
        self.worker: LoraWorker | None = None
        self._worker_tried = False
        dims = self.shape.module_dims()
        self.module_d_out = [dims[m][1] for _, m in self.module_keys]
        # Tests and debugging: request id -> logits of every position it computed.
        self.capture: dict[str, list[torch.Tensor]] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype, device: str,
                        max_num_seqs: int = 256) -> ModelRunner:
        return cls(LlamaForServing.from_checkpoint(path, dtype=dtype, device=device),
                   max_num_seqs)

    # -- adapters -----------------------------------------------------------------------
    def _slot_of(self, seqs: Seq[Sequence], pool: UnifiedPool,
                 cache: AdapterCache) -> dict[str, int]:
        names = sorted({s.adapter for s in seqs if s.adapter})
        adapters = [cache.resident(n).adapter for n in names]

        def read(adapter):  # from its pool pages (where it is resident), not the host store
            return pool.read_flat(cache.resident(adapter.name).pages)

        return self.slots.assign(adapters, read)

    @property
    def adapter_copies(self) -> int:
        """Adapters copied to reach the operator: into slot buffers, or out of scattered pool
        pages."""
        return self.slots.copies + self._pool_copies

    @property
    def lora_path(self) -> str:
        return "pool pages, native kernel" if self.native else "slot buffers, torch operator"

    def _rows(self, res: Resident, pool: UnifiedPool) -> AdapterRows:
        rows = res.rows
        if rows is None or rows.adapter is not res.adapter or not rows.valid():
            flat = pool.read_flat(res.pages)  # a view of consecutive pages, else a copy
            copied = not pool.is_run(res.pages)
            rows = res.rows = adapter_rows(res.adapter, flat, self.module_keys, copied)
            self._pool_copies += copied
        return rows

    def _pool_lora(self, batch: Batch, seqs: Seq[Sequence], pool: UnifiedPool,
                   cache: AdapterCache, spare_core: bool) -> PoolLoraContext | None:
        names = sorted({s.adapter for s in seqs if s.adapter})
        if not names:
            return None
        slots = _token_slots(batch, {n: i for i, n in enumerate(names)})
        rows = [self._rows(cache.resident(n), pool) for n in names]
        if not self._worker_tried:
            self._worker_tried = True
            self.worker = LoraWorker.maybe(self.lora_worker, self.model.dtype)
        return PoolLoraContext(self.native, slots, rows, self.module_keys, self.lora_cost_dim,
                               self.worker if spare_core else None, self.module_d_out)

    def close(self) -> None:
        """Stop the LoRA worker thread, if any (the next step may open another)."""
        if self.worker is not None:
            self.worker.close()
        self.worker, self._worker_tried = None, False

    def _slot_lora(self, batch: Batch, seqs: Seq[Sequence], pool: UnifiedPool,
                   cache: AdapterCache) -> LoraContext | None:
        slot_of = self._slot_of(seqs, pool, cache)
        if not slot_of:
            return None
        meta = LoraBatchMeta.build(_token_slots(batch, slot_of), self.slots.ranks, self.device,
                                   cost_dim=self.lora_cost_dim)
        return LoraContext(meta, self.slots.weights)

    # -- the step -------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: Batch, sample_seqs: list[Sequence], pool: UnifiedPool,
                cache: AdapterCache, spare_core: bool = True) -> list[int]:
        """One forward and the sampled tokens. ``spare_core``: whether the LoRA worker may
        compute beside this step (False while a co-serving slice has that core)."""
        ids: list[int] = []
        for seq, n in batch.prefills:
            ids.extend(seq.tokens(seq.num_cached, seq.num_cached + n))
        ids.extend(seq.token(seq.num_tokens - 1) for seq in batch.decodes)
        meta = AttentionMetadata.build(
            pool.block_size,
            [n for _, n in batch.prefills],
            [seq.num_cached + n for seq, n in batch.prefills],
            [seq.block_table for seq, _ in batch.prefills],
            [seq.num_tokens for seq in batch.decodes],
            [seq.block_table for seq in batch.decodes],
            self.device,
            pad_page=pool.null_page,
        )
        all_seqs = [s for s, _ in batch.prefills] + batch.decodes
        lora = (self._pool_lora(batch, all_seqs, pool, cache, spare_core) if self.native
                else self._slot_lora(batch, all_seqs, pool, cache))
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        try:
            hidden = self.model(input_ids, meta.positions, meta, pool.kv_view(), lora=lora)
        finally:
            if isinstance(lora, PoolLoraContext):
                lora.finish()
        if self.capture is not None:
            self._capture(hidden, batch)
        # Each sampled sequence's last token: prefill chunk ends, then every decode token.
        last: list[int] = []
        offset = 0
        sampled = {id(s) for s in sample_seqs}
        for seq, n in batch.prefills:
            offset += n
            if id(seq) in sampled:
                last.append(offset - 1)
        last.extend(range(offset, offset + len(batch.decodes)))
        if not last:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(last, device=self.device)])
        return self._sample(logits, sample_seqs).tolist()

    def _capture(self, hidden: torch.Tensor, batch: Batch) -> None:
        logits = self.model.compute_logits(hidden).cpu()
        offset = 0
        for seq, n in batch.prefills:
            self.capture.setdefault(seq.request_id, []).append(logits[offset:offset + n])
            offset += n
        for i, seq in enumerate(batch.decodes):
            self.capture.setdefault(seq.request_id, []).append(logits[offset + i:offset + i + 1])

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        dev = logits.device
        temperature = torch.tensor([s.params.temperature for s in seqs], device=dev)
        top_k = torch.tensor([s.params.top_k for s in seqs], device=dev)
        top_p = torch.tensor([s.params.top_p for s in seqs], device=dev)
        return sample(logits, temperature, top_k, top_p, [s.generator for s in seqs])


def _token_slots(batch: Batch, slot_of: dict[str, int]) -> list[int]:
    """Each token's adapter slot (-1: the bare base), in the forward's order: prefill
    chunks, then one token per decoding sequence."""
    slots: list[int] = []
    for seq, n in batch.prefills:
        slots.extend([slot_of.get(seq.adapter, -1)] * n)
    slots.extend(slot_of.get(seq.adapter, -1) for seq in batch.decodes)
    return slots
