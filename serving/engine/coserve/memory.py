"""Activation memory of fine-tuning slices, budgeted in the unified pool.

A slice keeps activations alive from its forward to the end of its backward. Before it
runs, the co-server reserves pool pages for them (kind ACTIVATION), so KV admission and
adapter loads see that memory as taken; they are freed when the slice ends. A slice that
does not fit the free pages is shrunk to fewer sequences, or waits.

The bytes per token start as an analytical upper estimate and become the largest value
measured: saved-tensor hooks see every tensor autograd keeps for backward, counted once per
storage and without the (shared or trainable) weights, times a safety margin.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from serving.engine.layout import ModelShape


def estimate_bytes_per_token(shape: ModelShape, dtype: torch.dtype) -> int:
    """A generous first guess before anything was measured."""
    elem = torch.empty((), dtype=dtype).element_size()
    # Per layer: norms, q/k/v/o inputs and outputs, attention output and statistics, MLP
    # inputs, gate/up outputs and their product; adapter intermediates are rank-sized.
    per_layer = 12 * shape.hidden_size + 6 * shape.intermediate_size
    # fp32 logits and their log-softmax, kept for the loss's backward.
    logits = 2 * shape.vocab_size * 4
    return shape.num_layers * per_layer * elem + logits


class ActivationMeter:
    """Bytes per (padded) token a slice of one job keeps for backward."""

    def __init__(self, model: nn.Module, shape: ModelShape, dtype: torch.dtype,
                 margin: float) -> None:
        self.margin = margin
        self.per_token = estimate_bytes_per_token(shape, dtype) * margin
        self.measured_max = 0.0  # largest measured bytes per token, without the margin
        self.measured_cost = 0  # the largest slice measured, in padded tokens
        self.measurements = 0
        self._weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pages(self, tokens: int, page_bytes: int) -> int:
        return max(1, math.ceil(tokens * self.per_token / page_bytes))

    def tokens_for(self, pages: int, page_bytes: int) -> int:
        return int(pages * page_bytes // self.per_token)

    def wants(self, tokens: int) -> bool:
        """Whether a slice of ``tokens`` should be measured: the first few, and any larger
        than all before (the hooks cost a Python call per saved tensor, on the GIL)."""
        return self.measurements < 3 or tokens > self.measured_cost

    @contextmanager
    def measure(self, tokens: int) -> Iterator[None]:
        """Count what autograd saves inside the block; update the per-token figure."""
        seen: set[int] = set()
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in seen and ptr not in self._weights:
                seen.add(ptr)
                total += storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.measurements += 1
        self.measured_cost = max(self.measured_cost, tokens)
        if tokens > 0 and total > 0:
            self.measured_max = max(self.measured_max, total / tokens)
            self.per_token = self.measured_max * self.margin
