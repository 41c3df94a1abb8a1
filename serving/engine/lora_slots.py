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
one to the last, idle ones too), and a slot written before over a never-used one.

An adapter takes a slot in the bin of its largest rank. A module where it has a smaller rank is
zero padded inside its own slot (never to the batch's largest rank); a module it does not target
is zero and listed in that module's ``skip`` set, so its tokens pass that module bare.

A bin holds up to ``max_slots_per_bin`` slots (the most adapters of one rank a step can hold is
the scheduler's sequence cap). A slot's rows are first written when an adapter takes it, and
the operator never reads past a bin's last used slot, so capacity costs nothing until used: on
CPU, where untouched memory is only address space (and a first touch costs a page fault per
4 KiB, far more than a copy), a bin starts at its cap; on a device, where memory is real, it
starts small and doubles. The bins a step creates or grows cost one relayout: a copy of each
old bin's written rows, within the store's headroom when it fits.
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
    written: int = 0  # slots [0, written) have defined rows; the rest were never touched

    @property
    def cap(self) -> int:
        return len(self.owners)


class LoraSlots:
    """``assign`` gives the step's adapters slots; ``weights`` is what LoraContext reads."""

    def __init__(self, shape: ModelShape, dtype: torch.dtype, device: torch.device | str,
                 max_slots_per_bin: int, initial_slots: int | None = None) -> None:
        self.shape = shape
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_slots_per_bin = max(1, max_slots_per_bin)
        if initial_slots is None:
            # On CPU capacity no adapter has used is untouched address space (see _relayout),
            # so a bin starts at its cap and never grows; device memory is real: start small.
            initial_slots = self.max_slots_per_bin if self.device.type == "cpu" else 4
        self.initial_slots = max(1, min(initial_slots, self.max_slots_per_bin))
        self._bins: dict[int, _Bin] = {}
        self._where: dict[str, tuple[int, int]] = {}  # adapter name -> (bin rank, index)
        self._tick = 0
        self.weights: dict[ModuleKey, LoraWeights] = {}
        self.ranks: tuple[int, ...] = ()
        self._first: dict[int, int] = {}  # bin rank -> its first global slot
        self._rows: list[int] = [0]  # global slot -> its first row (and the total at the end)
        self.copies = 0  # adapters copied into a slot (the work a per-step pack would redo)
        self.relayouts = 0  # bin creations and growths (one-off block copies)
        self.relayouts_in_place = 0  # of those, the ones the stores' headroom held
        # (A, B^T) store of each module: the buffers are views of its first rows.
        self._stores: dict[ModuleKey, tuple[Tensor, Tensor]] = {}

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
        live one to the last), then one written before (a first write faults its memory in,
        which costs more than evicting an idle adapter's copy), then an empty one, then the
        least recently used idle one."""
        b = self._bins[rank]
        free = [i for i, owner in enumerate(b.owners) if owner is None or owner.name not in wanted]
        lo, hi = (min(live), max(live)) if live else (0, b.cap)

        def cost(i: int) -> tuple:
            return (max(0, lo - i, i - hi), i >= b.written, b.owners[i] is not None,
                    b.last_used[i], i)
        return min(free, key=cost)

    def _order(self) -> list[_Bin]:
        return sorted(self._bins.values(), key=lambda b: -b.rank)

    # -- buffers ----------------------------------------------------------------------------
    def _relayout(self) -> None:
        """Lay the bins out again for their new sizes, each bin's written slots carried over.

        A bin only ever grows at its end and never moves towards the start, so its slots keep
        their indices: one copy per bin and buffer, not one per slot. Each buffer is a view of
        the first rows of an uninitialised store with headroom, and a slot's rows are first
        written when an adapter takes it (``_write``): fresh memory costs a page fault per
        4 KiB on first touch, far more than a copy, so capacity no adapter has used yet costs
        nothing, and most relayouts move blocks within the store.
        """
        old_first, old_rows = self._first, self._rows
        self._first, off = {}, 0
        for b in self._order():
            self._first[b.rank], off = off, off + b.cap
        self.ranks = tuple(b.rank for b in self._order() for _ in range(b.cap))
        self._rows = rows = _row_starts(self.ranks)
        # (old first row, new first row, written rows) of each bin that existed, last first:
        # blocks only move towards the end, so the last one moving first overwrites no source.
        blocks = sorted(((old_rows[old_first[b.rank]], rows[self._first[b.rank]],
                          b.written * b.rank) for b in self._bins.values()
                         if b.rank in old_first and b.written), reverse=True)
        dims = self.shape.module_dims()
        new: dict[ModuleKey, LoraWeights] = {}
        in_place = True
        for layer in range(self.shape.num_layers):
            for module in TARGET_MODULES:
                d_in, d_out = dims[module]
                key = (layer, module)
                prev = self.weights.get(key)
                stores = self._stores.get(key)
                if stores is None or stores[0].shape[0] < rows[-1]:
                    in_place = False
                    size = max(rows[-1], HEADROOM * stores[0].shape[0] if stores else 0)
                    try:
                        grown = tuple(_fresh(size, d, self.dtype, self.device)
                                      for d in (d_in, d_out))
                    except RuntimeError:  # no room for the headroom: the layout alone
                        grown = tuple(_fresh(rows[-1], d, self.dtype, self.device)
                                      for d in (d_in, d_out))
                    for old_lo, lo, n in blocks if stores else ():
                        for g, o in zip(grown, stores, strict=True):
                            g[lo:lo + n] = o[old_lo:old_lo + n]
                    stores = self._stores[key] = grown
                else:
                    for old_lo, lo, n in blocks:
                        for o in stores:
                            _move_rows(o, old_lo, lo, n)
                bias = None
                if prev is not None and prev.bias is not None:
                    bias = torch.zeros(len(self.ranks), d_out, dtype=self.dtype,
                                       device=self.device)
                skip = set(range(len(self.ranks)))
                for b in self._bins.values() if prev is not None else ():
                    if b.rank not in old_first:
                        continue
                    o, n = old_first[b.rank], self._first[b.rank]
                    if bias is not None:
                        bias[n:n + b.written] = prev.bias[o:o + b.written]
                    skip -= {n + i for i in range(b.written) if o + i not in prev.skip}
                A, Bt = (o[:rows[-1]] for o in stores)
                new[key] = LoraWeights(A=A, B=Bt.T, bias=bias, ranks=self.ranks,
                                       skip=frozenset(skip))
        self.weights = new
        self.relayouts += 1
        self.relayouts_in_place += in_place

    def _write(self, adapter: HostAdapter, slot: int, rank: int, flat: Tensor) -> None:
        b, row = self._bins[rank], self._rows[slot]
        index = slot - self._first[rank]
        if index > b.written:  # slots it skipped over join a span's rows: define them
            lo = self._rows[self._first[rank] + b.written]
            for w in self.weights.values():
                w.A[lo:row].zero_()
                w.B.T[lo:row].zero_()
        b.written = max(b.written, index + 1)
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
        """Memory the slot buffers hold: on CPU the written slot rows (capacity no adapter has
        used is untouched address space), on a device the whole stores."""
        if self.device.type != "cpu":
            return sum(t.numel() * t.element_size() for pair in self._stores.values()
                       for t in pair) + sum(w.bias.numel() * w.bias.element_size()
                                            for w in self.weights.values() if w.bias is not None)
        per_row = sum(i + o for i, o in self.shape.module_dims().values()) * self.shape.num_layers
        rows = sum(b.written * b.rank for b in self._bins.values())
        bias = sum(w.bias.numel() for w in self.weights.values() if w.bias is not None)
        return (rows * per_row + bias) * torch.empty(0, dtype=self.dtype).element_size()

    def slots_in_use(self) -> int:
        return sum(o is not None for b in self._bins.values() for o in b.owners)


# A store that overflows is replaced by one this many times larger (on CPU its unused rows
# cost no memory until written). Tests set POISON to fill fresh stores with NaN: a read of
# rows no adapter wrote then shows in the results.
HEADROOM = 2
POISON = False


def _fresh(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    if POISON:
        return torch.full((rows, cols), float("nan"), dtype=dtype, device=device)
    return torch.empty(rows, cols, dtype=dtype, device=device)


def _move_rows(t: Tensor, src: int, dst: int, n: int) -> None:
    """t[dst:dst + n] = t[src:src + n] for dst >= src, without a temporary: in chunks of the
    shift, last chunk first, so a chunk only lands on rows already moved."""
    step = dst - src
    hi = n if step else 0
    while hi > 0:
        lo = max(hi - step, 0)
        t[dst + lo:dst + hi] = t[src + lo:src + hi]
        hi = lo


def _row_starts(ranks: Sequence[int]) -> list[int]:
    out = [0]
    for r in ranks:
        out.append(out[-1] + r)
    return out
