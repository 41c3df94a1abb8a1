"""Engine configuration: model, pool size, batching limits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    model: str  # local checkpoint directory
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    block_size: int = 16  # tokens per KV page
    num_pages: int | None = None  # pool size in pages; None = from pool_bytes
    pool_bytes: int = 256 * 2**20
    max_num_seqs: int = 64
    max_batched_tokens: int = 512
    max_model_len: int | None = None  # default: the checkpoint's max_position_embeddings
    max_queue: int = 4096  # waiting requests beyond this are refused (overload)
    watermark_pages: int = 1
    # CPU float32 or bfloat16: a oneDNN-packed copy of each base projection weight
    # (packed_linear.py), 1.1-1.7x faster GEMMs for the base weights' bytes again.
    packed_weights: bool = True
    # CPU pool path: the LoRA deltas on a worker thread while the base GEMM runs
    # (lora_worker.py). None: on where the process has a core beyond torch's intra-op threads.
    lora_worker: bool | None = None
