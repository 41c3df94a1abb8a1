"""Persistent slot buffers: the layout the LoRA operator reads, updated per adapter, not per step.

Pool pages are where adapters live (residency, eviction, admission count them). The operator
wants each module's A and B of the step's adapters as rows of one tensor, with adapters of one
rank next to each other (lora_meta.py makes each rank group a zero-copy view then). Packing the
active set every step copies every active adapter every step; here each (layer, module) keeps
one buffer whose rows are grouped in rank bins (largest rank first), and an adapter is copied in
from its pool pages once, when it first needs a slot. It keeps the slot until another adapter
needs it, so a steady decode batch copies nothing, and a batch whose membership changes copies
only the adapters that joined. A joining adapter takes an idle slot inside the span of the
step's slots before one outside it (the operator reads every slot's weights from the first live
one to the last, idle ones too), then an empty one, then the least recently used.

An adapter takes a slot in the bin of its largest rank. A module where it has a smaller rank is
zero padded inside its own slot (never to the batch's largest rank); a module it does not target
is zero and listed in that module's ``skip`` set, so its tokens pass that module bare. A bin
grows by doubling up to ``max_slots_per_bin`` (the most adapters of one rank a step can hold is
the scheduler's sequence cap); the bins a step creates or grows cost one relayout, a copy of
each old bin's block of rows.
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
        self._caps: dict[int, int] = {}  # bin rank -> its slots in the current buffers
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
        live: dict[int, set[int]] = {}  # bin rank -> indices of this step's adapters
        for a in adapters:
            where = self._where.get(a.name)
            if where is not None and self._bins[where[0]].owners[where[1]] is a:
                self._bins[where[0]].last_used[where[1]] = self._tick
                live.setdefault(where[0], set()).add(where[1])
            else:
                missing.append(a)
        self._reserve(adapters, missing)
        placed: list[tuple[HostAdapter, int, int]] = []
        for a in missing:
            rank = max(1, a.max_rank)
            index = self._free_slot(rank, wanted, live.setdefault(rank, set()))
            old = self._bins[rank].owners[index]
            if old is not None and self._where.get(old.name) == (rank, index):
                del self._where[old.name]
            stale = self._where.pop(a.name, None)  # a replaced adapter frees its old slot
            if stale is not None:
                self._bins[stale[0]].owners[stale[1]] = None
            self._bins[rank].owners[index] = a
            self._bins[rank].last_used[index] = self._tick
            self._where[a.name] = (rank, index)
            live[rank].add(index)
            placed.append((a, rank, index))
        if placed:
            for a, rank, index in placed:
                self._write(a, self._first[rank] + index, rank, read(a))
            self.copies += len(placed)
        return {a.name: self._first[self._where[a.name][0]] + self._where[a.name][1]
                for a in adapters}

    def _reserve(self, adapters: Sequence[HostAdapter], missing: Sequence[HostAdapter]) -> None:
        """Create and grow (by doubling) the bins this step needs, with one relayout."""
        need: dict[int, int] = {}
        for a in adapters:
            rank = max(1, a.max_rank)
            need[rank] = need.get(rank, 0) + 1
        changed = False
        for rank in {max(1, a.max_rank) for a in missing}:
            if need[rank] > self.max_slots_per_bin:
                raise RuntimeError(f"more than {self.max_slots_per_bin} adapters of rank {rank} "
                                   "in one step")
            b = self._bins.get(rank)
            cap = b.cap if b is not None else self.initial_slots
            while cap < need[rank]:
                cap *= 2
            cap = min(cap, self.max_slots_per_bin)
            if b is None:
                self._bins[rank] = _Bin(rank, [None] * cap, [0] * cap)
            elif cap > b.cap:
                grow = cap - b.cap
                b.owners.extend([None] * grow)
                b.last_used.extend([0] * grow)
            else:
                continue
            changed = True
        if changed:
            self._relayout()

    def _free_slot(self, rank: int, wanted: set[str], live: set[int]) -> int:
        """A slot for a new adapter of the bin (``_reserve`` made room): one that does not widen
        the span of the step's slots (the operator reads every slot's weights from the first
        live one to the last), then an empty one, then the least recently used idle one."""
        b = self._bins[rank]
        free = [i for i, owner in enumerate(b.owners) if owner is None or owner.name not in wanted]
        lo, hi = (min(live), max(live)) if live else (0, b.cap)

        def cost(i: int) -> tuple:
            return max(0, lo - i, i - hi), b.owners[i] is not None, b.last_used[i], i
        return min(free, key=cost)

    def _order(self) -> list[_Bin]:
        return sorted(self._bins.values(), key=lambda b: -b.rank)

    # -- buffers ----------------------------------------------------------------------------
    def _relayout(self) -> None:
        """New buffers for the new bin sizes, each old bin's block of rows carried over whole.

        A bin only ever grows at its end, so its slots keep their indices: one copy per bin and
        buffer, not one per slot.
        """
        old_weights, old_first, old_rows = self.weights, self._first, self._rows
        old_cap = self._caps
        self._first, off = {}, 0
        for b in self._order():
            self._first[b.rank], off = off, off + b.cap
        self._caps = {b.rank: b.cap for b in self._bins.values()}
        self.ranks = tuple(b.rank for b in self._order() for _ in range(b.cap))
        self._rows = rows = _row_starts(self.ranks)
        # (old first slot, new first slot, slots, rank) of each bin that existed before.
        blocks = [(old_first[r], self._first[r], cap, r) for r, cap in old_cap.items()]
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
                for o, n, cap, rank in blocks if prev is not None else ():
                    src, dst, size = old_rows[o], rows[n], cap * rank
                    A[dst:dst + size] = prev.A[src:src + size]
                    Bt[dst:dst + size] = prev.B.T[src:src + size]
                    if bias is not None:
                        bias[n:n + cap] = prev.bias[o:o + cap]
                    skip -= {n + i for i in range(cap) if o + i not in prev.skip}
                new[key] = LoraWeights(A=A, B=Bt.T, bias=bias, ranks=self.ranks,
                                       skip=frozenset(skip))
        self.weights = new
        self.relayouts += 1

    def _write(self, adapter: HostAdapter, slot: int, rank: int, flat: Tensor) -> None:
        row = self._rows[slot]
        for key, w in self.weights.items():
            s = adapter.layout.get(key)
            bt = w.B.T
            if s is None or s.rank < rank:  # rows the adapter does not fill must be zero
                w.A[row:row + rank].zero_()
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
