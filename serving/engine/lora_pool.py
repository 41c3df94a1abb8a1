"""LoRA read in place from the unified pool's pages (CPU, float32 or bfloat16, the native BGMV
kernel).

S-LoRA's unified paging serves adapters from the pages they are resident in; the slot buffers
(lora_slots.py) instead copy each adapter joining a batch into per-module rank bins, which on
CPU cost more per step than the deltas themselves. Here nothing is copied:

- ``AdapterRows``: per resident adapter, once, the address of each module's A [r, d_in], B^T
  [r, d_out] and bias inside its pages (the adapter store's flat layout; the cache allocates an
  adapter's pages as one consecutive run, so its weights are one view of the pool). An adapter
  whose pages could not be consecutive gets one private contiguous copy, counted.
- ``PoolLoraContext``: per step, one index of the batch's address tables gives every token's
  addresses for every module; per module one kernel call adds all deltas, whatever the mix of
  adapters and ranks. An adapter with many tokens in the step (a prefill chunk, a popular
  adapter) instead takes a GEMM pair on views of its weights, where a GEMM's throughput beats
  the per-token kernel. Where a core is spare, the kernel's work runs on a worker thread
  during the module's base GEMM (lora_worker.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from serving.engine import kernels
from serving.engine.adapter_store import HostAdapter, ModuleKey, unpack
from serving.engine.layout import SHARED_INPUT
from serving.engine.lora_worker import LoraWorker

# An adapter's tokens go to a GEMM pair once they are this many multiply-adds (tokens * rank *
# (d_in + d_out)); twice this when they are not consecutive (a gather and a scatter more).
# Measured on CPU, one thread: the kernel does ~19 GMAC/s, a GEMM pair ~28 GMAC/s after ~16 us
# of launches; they cross near 1M.
RUN_GEMM_MACS = 1_000_000
# With the LoRA worker the kernel's work runs during the base GEMM, where it costs the engine's
# thread nothing, so only runs this long go to GEMM pairs (on the engine's thread, after the
# GEMM). Measured (bench/serving.py's model, bf16, n = 1, whose decode tokens share one adapter):
# 31.8 req/s at 4M against 25.6 at 1M.
RUN_GEMM_MACS_WORKER = 4_000_000
# An adapter owning at least this share of a step's (non-consecutive) tokens multiplies them
# all and zeroes the others' rows: two GEMMs with no gather or scatter, waste under a third.
DENSE_SHARE = 0.75
_GROUP_OF_FIRST = {group[0]: group for group in SHARED_INPUT}


@dataclass
class AdapterRows:
    """Where a resident adapter's weights are, for the kernel."""

    adapter: HostAdapter
    flat: Tensor  # its weights: a view of its pool pages (or a copy); kept alive here
    table: Tensor  # int64 [modules, 4]: A address, B^T address, bias address (0: none), rank
    copied: bool  # its pages were not consecutive, so ``flat`` is a private copy
    base: int = 0  # flat's address when the table was made

    def valid(self) -> bool:
        """The table still points at ``flat`` (a storage moved, e.g. to shared memory, would
        leave it pointing at freed memory)."""
        return self.flat.data_ptr() == self.base


def adapter_rows(adapter: HostAdapter, flat: Tensor, keys: Sequence[ModuleKey],
                 copied: bool = False) -> AdapterRows:
    if flat.dtype not in kernels.NATIVE_DTYPES or flat.device.type != "cpu" \
            or not flat.is_contiguous() or flat.numel() < adapter.flat.numel():
        raise ValueError("adapter rows need its flat float32 or bfloat16 weights, contiguous on "
                         "the CPU")
    base, size = flat.data_ptr(), flat.element_size()
    rows = []
    for key in keys:
        s = adapter.layout.get(key)
        if s is None or s.rank == 0:
            rows.append((0, 0, 0, 0))
            continue
        a = base + s.offset * size
        b = a + s.rank * s.d_in * size
        rows.append((a, b, b + s.rank * s.d_out * size if s.has_bias else 0, s.rank))
    table = torch.tensor(rows, dtype=torch.int64).view(len(keys), 4)
    return AdapterRows(adapter, flat, table, copied, base)


class PoolLoraContext:
    """What the model sees for one step: ``lora.begin(layer, module, x)`` before a target
    module's base GEMM, ``y = lora.apply(layer, module, x, y)`` after it.

    ``token_slots[t]`` indexes ``adapters`` (-1: the bare base model).
    """

    def __init__(self, lib: ctypes.CDLL, token_slots: Sequence[int],
                 adapters: Sequence[AdapterRows], keys: Sequence[ModuleKey], cost_dim: int,
                 worker: LoraWorker | None = None, d_out: Sequence[int] = ()):
        self.lib = lib
        self.worker = worker
        self.d_out = list(d_out)  # per module: the worker's delta width
        self.adapters = list(adapters)
        self.keys = list(keys)
        self.index = {key: m for m, key in enumerate(self.keys)}
        M, k = len(self.keys), len(self.adapters)
        slots = torch.as_tensor(list(token_slots), dtype=torch.long)
        if slots.numel() and (int(slots.min()) < -1 or int(slots.max()) >= k):
            raise ValueError(f"token slots must lie in -1..{k - 1}")
        # [adapters + 1, modules, 4]: the last row (all zero) serves bare tokens.
        tables = torch.stack([a.table for a in self.adapters]
                             + [torch.zeros(M, 4, dtype=torch.int64)])
        idx = torch.where(slots >= 0, slots, k)
        # [modules, 4, tokens]: each module's [4, T] block is what the kernel reads.
        self.where = tables[idx].permute(1, 2, 0).contiguous()
        # Per module: (tokens, adapter) done as a GEMM pair; tokens a slice, an index, or a
        # [T, 1] mask of the other tokens.
        self.runs: dict[int, list[tuple[slice | Tensor, int]]] = {}
        self._gemm_runs(idx, tables[:k, :, 3], cost_dim,
                        RUN_GEMM_MACS_WORKER if worker is not None else RUN_GEMM_MACS)
        # Per module: whether any token is left to the kernel (the rest went to GEMM runs).
        self.kernel_tokens = (self.where[:, 3] > 0).any(1).tolist()
        if worker is not None and len(self.d_out) != M:
            raise ValueError("the LoRA worker needs every module's output width")
        self._job: dict[int, int] = {}  # module -> its place in the worker's posted job
        self._job_x = 0  # the address of the x that job reads

    def _gemm_runs(self, idx: Tensor, ranks: Tensor, cost_dim: int, macs: int) -> None:
        """Take an adapter's tokens away from the kernel, per module (a module's rank decides),
        into one GEMM pair when it has enough of them: a prefill chunk, or many decoding
        sequences of one popular adapter. Its tokens are a view when consecutive; when they
        are nearly all the tokens, every row is multiplied and the others' zeroed; else they
        are gathered and scattered back (two more launches, so a higher bar). The loop is
        over such adapters only, a few a step."""
        k = ranks.shape[0]  # ranks: [adapters, modules]
        if not idx.numel() or not k:
            return
        counts = torch.bincount(idx, minlength=k + 1)[:k]
        max_rank = ranks.max(1).values
        for j in (counts * max_rank * cost_dim >= macs).nonzero().squeeze(1).tolist():
            mine = idx == j
            pos = mine.nonzero().squeeze(1)
            n, lo = pos.numel(), int(pos[0])
            if int(pos[-1]) - lo + 1 == n:
                span: slice | Tensor = slice(lo, lo + n)
            elif n >= DENSE_SHARE * idx.numel() and self.adapters[j].table[:, 2].eq(0).all():
                span = ~mine[:, None]  # nearly every token: all rows, others' masked to zero
            else:
                span = pos
            gathered = isinstance(span, Tensor) and span.dtype != torch.bool
            bar = 2 * macs if gathered else macs
            for m in (ranks[j] * n * cost_dim >= bar).nonzero().squeeze(1).tolist():
                self.where[m, 3, mine] = 0
                self.runs.setdefault(m, []).append((span, j))

    def begin(self, layer: int, module: str, x: Tensor) -> None:
        """Before a module's base GEMM: at the first module of a group reading the same x,
        hand the group's kernel tokens to the worker thread, as one job."""
        if self.worker is None:
            return
        group = _GROUP_OF_FIRST.get(module)
        if group is None:  # a later module of a group: its deltas are in the job already
            m = self.index.get((layer, module))
            if m in self._job and x.data_ptr() != self._job_x:
                raise RuntimeError(f"{module} of layer {layer} does not read its group's input")
            return
        mods = [m for m in (self.index.get((layer, name)) for name in group)
                if m is not None and self.kernel_tokens[m]]
        if mods:
            self.worker.submit(x if x.stride(1) == 1 else x.contiguous(),
                               [self.where[m] for m in mods], [self.d_out[m] for m in mods])
            self._job, self._job_x = {m: i for i, m in enumerate(mods)}, x.data_ptr()

    def apply(self, layer: int, module: str, x: Tensor, y: Tensor) -> Tensor:
        m = self.index.get((layer, module))
        if m is None:
            return y
        if x.stride(1) != 1:
            x = x.contiguous()
        i = self._job.pop(m, None)
        if i is not None:
            self.worker.join(i, y)
        elif self.kernel_tokens[m]:
            kernels.bgmv(self.lib, y, x, self.where[m])
        for span, j in self.runs.get(m, ()):
            rows = self.adapters[j]
            A, B, bias = unpack(rows.flat, rows.adapter.layout[self.keys[m]])
            if isinstance(span, slice):
                y[span].addmm_(x[span] @ A.T, B.T)
                if bias is not None:
                    y[span] += bias
            elif span.dtype == torch.bool:  # others' mask (no bias: _gemm_runs checked)
                y.addmm_((x @ A.T).masked_fill_(span, 0), B.T)
            else:
                delta = (x.index_select(0, span) @ A.T) @ B.T
                if bias is not None:
                    delta += bias
                y.index_add_(0, span, delta)
        return y

    def finish(self) -> None:
        """After the forward (which may have failed between a submit and its join): no job
        may outlive the step's tensors."""
        if self.worker is not None:
            self.worker.finish()
        self._job = {}
