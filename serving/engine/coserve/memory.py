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


class SavedBytes:
    """Counts the bytes autograd saves for backward inside ``with counter:``, once per
    storage and without the tensors in ``exclude`` (weights: shared or trainable)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.total = 0
        self._seen: set[int] = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def storages(model: nn.Module) -> set[int]:
        return {p.untyped_storage().data_ptr() for p in model.parameters()}

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._seen and ptr not in self.exclude:
            self._seen.add(ptr)
            self.total += storage.nbytes()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class ActivationMeter:
    """Bytes per (padded) token a slice of one job keeps for backward."""

    def __init__(self, shape: ModelShape, dtype: torch.dtype, margin: float) -> None:
        self.margin = margin
        self.per_token = estimate_bytes_per_token(shape, dtype) * margin
        self.measured_max = 0.0  # largest measured bytes per token, without the margin
        self.measured_cost = 0  # the largest slice measured, in padded tokens
        self.measurements = 0

    def pages(self, tokens: int, page_bytes: int) -> int:
        return max(1, math.ceil(tokens * self.per_token / page_bytes))

    def tokens_for(self, pages: int, page_bytes: int) -> int:
        return int(pages * page_bytes // self.per_token)

    def wants(self, tokens: int) -> bool:
        """Whether a slice of ``tokens`` should be measured: the first few, and any larger
        than all before (the hooks cost a Python call per saved tensor)."""
        return self.measurements < 3 or tokens > self.measured_cost

    def record(self, tokens: int, saved_bytes: int) -> None:
        """A measured slice of ``tokens`` saved ``saved_bytes``: update the per-token figure."""
        self.measurements += 1
        self.measured_cost = max(self.measured_cost, tokens)
        if tokens > 0 and saved_bytes > 0:
            self.measured_max = max(self.measured_max, saved_bytes / tokens)
            self.per_token = self.measured_max * self.margin
