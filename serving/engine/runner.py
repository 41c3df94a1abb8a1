"""The model runner: turns a scheduled batch into tensors, runs the model, samples.

Per step it builds the attention metadata (slots, block tables) and the LoRA batch
metadata (each token's adapter slot). Adapter weights are read from their pool pages and
packed per (layer, module) only when the set of active adapters changes; a steady decode
batch reuses the packed weights step after step.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from serving.engine.adapter_cache import AdapterCache
from serving.engine.adapter_store import unpack
from serving.engine.attention import AttentionMetadata
from serving.engine.lora_op import LoraBatchMeta, LoraContext, LoraWeights, pack_lora_weights
from serving.engine.model import LlamaForServing
from serving.engine.pool import UnifiedPool
from serving.engine.sampling import sample
from serving.engine.scheduler import Batch
from serving.engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaForServing) -> None:
        self.model = model
        self.shape = model.shape
        self.device = next(model.parameters()).device
        self._packed_key: tuple | None = None
        self._packed: dict[tuple[int, str], LoraWeights] = {}
        self.repacks = 0
        # Tests and debugging: request id -> logits of every position it computed.
        self.capture: dict[str, list[torch.Tensor]] | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, dtype: torch.dtype, device: str) -> ModelRunner:
        return cls(LlamaForServing.from_checkpoint(path, dtype=dtype, device=device))

    # -- adapters -----------------------------------------------------------------------
    def _active_adapters(self, seqs: Seq[Sequence], cache: AdapterCache) -> list[str]:
        names = {s.adapter for s in seqs if s.adapter}
        # Slots in rank order make each rank group a zero-copy view for the grouped GEMM.
        return sorted(names, key=lambda n: (-cache.resident(n).adapter.max_rank, n))

    def _pack(self, names: list[str], pool: UnifiedPool,
              cache: AdapterCache) -> dict[tuple[int, str], LoraWeights]:
        key = (tuple(names), cache.generation)
        if key == self._packed_key:
            return self._packed
        per_adapter = []
        for name in names:
            res = cache.resident(name)
            flat = pool.read_flat(res.pages)  # read from the pool, not the host store
            per_adapter.append({k: unpack(flat, s) for k, s in res.adapter.layout.items()})
        modules = sorted({k for layout in per_adapter for k in layout})
        packed = {m: pack_lora_weights([a.get(m) for a in per_adapter]) for m in modules}
        self._packed_key, self._packed = key, packed
        self.repacks += 1
        return packed

    # -- the step -------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: Batch, sample_seqs: list[Sequence], pool: UnifiedPool,
                cache: AdapterCache) -> list[int]:
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
        )
        all_seqs = [s for s, _ in batch.prefills] + batch.decodes
        lora = None
        names = self._active_adapters(all_seqs, cache)
        if names:
            slot_of = {n: i for i, n in enumerate(names)}
            slots: list[int] = []
            for seq, n in batch.prefills:
                slots.extend([slot_of.get(seq.adapter, -1)] * n)
            slots.extend(slot_of.get(seq.adapter, -1) for seq in batch.decodes)
            weights = self._pack(names, pool, cache)
            ranks = [cache.resident(n).adapter.max_rank for n in names]
            lora = LoraContext(LoraBatchMeta.build(slots, ranks, self.device), weights)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, meta.positions, meta, pool.kv_view(), lora=lora)
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
