"""Persistent slot buffers: the layout the LoRA operator reads, updated per adapter, not per step.

Pool pages are where adapters live (residency, eviction, admission count them). The operator
wants each module's A and B of the step's adapters as rows of one tensor, with adapters of one
rank next to each other (lora_meta.py makes each rank group a zero-copy view then). Packing the
active set every step copies every active adapter every step; here each (layer, module) keeps
one buffer whose rows are grouped in rank bins (largest rank first), and an adapter is copied in
from its pool pages once, when it first needs a slot. It keeps the slot until another adapter
needs it (least recently used), so a steady decode batch copies nothing, and a batch whose
membership changes copies only the adapters that joined.

An adapter takes a slot in the bin of its largest rank. A module where it has a smaller rank is
zero padded inside its own slot (never to the batch's largest rank); a module it does not target
is zero and listed in that module's ``skip`` set, so its tokens pass that module bare. A bin
grows by doubling (a one-off copy of the buffers) up to ``max_slots_per_bin``: the most adapters
of one rank a step can hold is the scheduler's sequence cap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from serving.engine.adapter_store import HostAdapter, ModuleKey, unpack
from serving.engine.layout import TARGET_MODULES, ModelShape
from serving.engine.lora_op import LoraWeights


@dataclass
class _Bin:
    rank: int
    owners: list[HostAdapter | None]
    last_used: list[int] = field(default_factory=list)

    @property
    def cap(self) -> int:
        return len(self.owners)


class LoraSlots:
    """``assign`` gives the step's adapters slots; ``weights`` is what LoraContext reads."""

    def __init__(self, shape: ModelShape, dtype: torch.dtype, device: torch.device | str,
                 max_slots_per_bin: int, initial_slots: int = 4) -> None:
        self.shape = shape
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_slots_per_bin = max(1, max_slots_per_bin)
        self.initial_slots = max(1, min(initial_slots, self.max_slots_per_bin))
        self._bins: dict[int, _Bin] = {}
        self._where: dict[str, tuple[int, int]] = {}  # adapter name -> (bin rank, index)
        self._tick = 0
        self.weights: dict[ModuleKey, LoraWeights] = {}
        self.ranks: tuple[int, ...] = ()
        self._first: dict[int, int] = {}  # bin rank -> its first global slot
        self._rows: list[int] = [0]  # global slot -> its first row (and the total at the end)
        self.copies = 0  # adapters copied into a slot (the work a per-step pack would redo)
        self.relayouts = 0  # bin growths (one-off buffer copies)

    # -- slots ------------------------------------------------------------------------------
    def assign(self, adapters: Sequence[HostAdapter],
               read: Callable[[HostAdapter], Tensor]) -> dict[str, int]:
        """Global slot index of each adapter, copying in (via ``read``: its flat weights from
        the pool) those not already in place. Adapters replaced in the store since they were
        copied are copied again."""
        self._tick += 1
        wanted = {a.name for a in adapters}
        missing = []
        for a in adapters:
            where = self._where.get(a.name)
            if where is not None and self._bins[where[0]].owners[where[1]] is a:
                self._bins[where[0]].last_used[where[1]] = self._tick
            else:
                missing.append(a)
        placed: list[tuple[HostAdapter, int, int]] = []
        for a in missing:
            rank = max(1, a.max_rank)
            index = self._free_slot(rank, wanted)
            old = self._bins[rank].owners[index]
            if old is not None and self._where.get(old.name) == (rank, index):
                del self._where[old.name]
            stale = self._where.pop(a.name, None)  # a replaced adapter frees its old slot
            if stale is not None:
                self._bins[stale[0]].owners[stale[1]] = None
            self._bins[rank].owners[index] = a
            self._bins[rank].last_used[index] = self._tick
            self._where[a.name] = (rank, index)
            placed.append((a, rank, index))
        if placed:
            for a, rank, index in placed:
                self._write(a, self._first[rank] + index, rank, read(a))
            self.copies += len(placed)
        return {a.name: self._first[self._where[a.name][0]] + self._where[a.name][1]
                for a in adapters}

    def _free_slot(self, rank: int, wanted: set[str]) -> int:
        b = self._bins.get(rank)
        if b is None:
            self._bins[rank] = b = _Bin(rank, [None] * self.initial_slots,
                                        [0] * self.initial_slots)
            self._relayout()
        for i, owner in enumerate(b.owners):
            if owner is None:
                return i
        # Least recently used among slots this step does not need.
        idle = [i for i, owner in enumerate(b.owners) if owner.name not in wanted]
        if idle:
            return min(idle, key=lambda i: b.last_used[i])
        if b.cap >= self.max_slots_per_bin:
            raise RuntimeError(f"more than {self.max_slots_per_bin} adapters of rank {rank} "
                               "in one step")
        grow = min(b.cap * 2, self.max_slots_per_bin) - b.cap
        b.owners.extend([None] * grow)
        b.last_used.extend([0] * grow)
        self._relayout()
        return b.cap - grow

    def _order(self) -> list[_Bin]:
        return sorted(self._bins.values(), key=lambda b: -b.rank)

    # -- buffers ----------------------------------------------------------------------------
    def _relayout(self) -> None:
        """New buffers for the new bin sizes, with every occupied slot's rows carried over."""
        old_weights, old_ranks, old_first, old_rows = (self.weights, self.ranks, self._first,
                                                       self._rows)
        self._first, off = {}, 0
        for b in self._order():
            self._first[b.rank], off = off, off + b.cap
        self.ranks = tuple(b.rank for b in self._order() for _ in range(b.cap))
        self._rows = rows = _row_starts(self.ranks)
        # (old slot, new slot, rank) of each occupied slot that existed before; past the old
        # end of its bin, an old index falls into the next bin, of another rank.
        moves = []
        for rank, index in self._where.values():
            o = old_first.get(rank)
            if o is not None and o + index < len(old_ranks) and old_ranks[o + index] == rank:
                moves.append((o + index, self._first[rank] + index, rank))
        dims = self.shape.module_dims()
        new: dict[ModuleKey, LoraWeights] = {}
        for layer in range(self.shape.num_layers):
            for module in TARGET_MODULES:
                d_in, d_out = dims[module]
                key = (layer, module)
                prev = old_weights.get(key)
                A = torch.zeros(rows[-1], d_in, dtype=self.dtype, device=self.device)
                Bt = torch.zeros(rows[-1], d_out, dtype=self.dtype, device=self.device)
                bias = None
                if prev is not None and prev.bias is not None:
                    bias = torch.zeros(len(self.ranks), d_out, dtype=self.dtype,
                                       device=self.device)
                skip = set(range(len(self.ranks)))
                for o, n, rank in moves if prev is not None else ():
                    A[rows[n]:rows[n] + rank] = prev.A[old_rows[o]:old_rows[o] + rank]
                    Bt[rows[n]:rows[n] + rank] = prev.B.T[old_rows[o]:old_rows[o] + rank]
                    if bias is not None:
                        bias[n] = prev.bias[o]
                    if o not in prev.skip:
                        skip.discard(n)
                new[key] = LoraWeights(A=A, B=Bt.T, bias=bias, ranks=self.ranks,
                                       skip=frozenset(skip))
        self.weights = new
        self.relayouts += 1

    def _write(self, adapter: HostAdapter, slot: int, rank: int, flat: Tensor) -> None:
        row = self._rows[slot]
        for key, w in self.weights.items():
            s = adapter.layout.get(key)
            w.A[row:row + rank].zero_()
            bt = w.B.T
            bt[row:row + rank].zero_()
            if s is None or s.rank == 0:
                w.skip = w.skip | {slot}
                if w.bias is not None:
                    w.bias[slot].zero_()
                continue
            A, B, bias = unpack(flat, s)
            w.A[row:row + s.rank] = A
            bt[row:row + s.rank] = B.T
            if bias is not None and w.bias is None:
                w.bias = torch.zeros(len(self.ranks), w.d_out, dtype=self.dtype,
                                     device=self.device)
            if w.bias is not None:
                if bias is None:
                    w.bias[slot].zero_()
                else:
                    w.bias[slot] = bias
            w.skip = w.skip - {slot}

    # -- reporting --------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.weights.values()
                   for t in (w.A, w.B, w.bias) if t is not None)

    def slots_in_use(self) -> int:
        return sum(o is not None for b in self._bins.values() for o in b.owners)


def _row_starts(ranks: Sequence[int]) -> list[int]:
    out = [0]
    for r in ranks:
        out.append(out[-1] + r)
    return out
