"""Which adapters are resident in the pool: LRU eviction, pinning, prefetch.

Adapters of running requests are pinned (a reference count), idle ones are evicted least
recently used when pages are needed, and adapters of queued requests are prefetched while
pages are free. Nothing here touches KV pages: the scheduler decides between evicting an
adapter and preempting a sequence.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving.engine.adapter_store import AdapterStore, HostAdapter
from serving.engine.pool import ADAPTER, PoolExhausted, UnifiedPool

if TYPE_CHECKING:
    from serving.engine.lora_pool import AdapterRows


@dataclass
class Resident:
    adapter: HostAdapter
    pages: list[int]
    pins: int = 0
    rows: AdapterRows | None = None  # where the LoRA kernel reads it; the runner's, lazily


class AdapterCache:
    def __init__(self, pool: UnifiedPool, store: AdapterStore, consecutive: bool = False) -> None:
        self.pool = pool
        self.store = store
        # Place each adapter on one run of consecutive pages where there is one (the LoRA
        # kernel then reads it in place); the search sorts the free list, O(pages) a load.
        self.consecutive = consecutive
        self._resident: OrderedDict[str, Resident] = OrderedDict()  # LRU first
        self.loads = 0
        self.evictions = 0

    def is_resident(self, name: str) -> bool:
        return name in self._resident

    def resident(self, name: str) -> Resident:
        return self._resident[name]

    def resident_names(self) -> list[str]:
        return list(self._resident)

    def pages_needed(self, name: str) -> int:
        res = self._resident.get(name)
        if res is not None and (res.adapter is self.store.get(name) or res.pins):
            return 0
        adapter = self.store.get(name)
        return self.pool.pages_for(adapter.flat.numel()) if adapter else 0

    def evictable_pages(self) -> int:
        return sum(len(r.pages) for r in self._resident.values() if r.pins == 0)

    def touch(self, name: str) -> None:
        self._resident.move_to_end(name)

    def evict_one(self) -> bool:
        """Evict the least recently used unpinned adapter; False if none can go."""
        for name, res in self._resident.items():
            if res.pins == 0:
                del self._resident[name]
                self.pool.free(res.pages)
                self.evictions += 1
                return True
        return False

    def load(self, name: str, evict: bool = True) -> bool:
        """Make ``name`` resident; evict idle adapters if allowed. False if it cannot fit."""
        adapter = self.store.get(name)
        res = self._resident.get(name)
        if res is not None and (res.adapter is adapter or res.pins):
            self.touch(name)  # a replaced adapter in use keeps serving until it is idle
            return True
        if res is not None:
            self.drop(name)
        if adapter is None:
            raise KeyError(name)
        need = self.pool.pages_for(adapter.flat.numel())
        while self.pool.num_free < need:
            if not evict or not self.evict_one():
                return False
        try:
            pages = self.pool.alloc(need, ADAPTER, consecutive=self.consecutive)
        except PoolExhausted:
            return False
        self.pool.write_flat(pages, adapter.flat)
        self._resident[name] = Resident(adapter, pages)
        self.loads += 1
        return True

    def pin(self, name: str) -> None:
        self._resident[name].pins += 1
        self.touch(name)

    def unpin(self, name: str) -> None:
        res = self._resident.get(name)
        if res is not None and res.pins > 0:
            res.pins -= 1

    def drop(self, name: str) -> bool:
        """Remove an unpinned adapter from the pool (e.g. on unload); False if pinned."""
        res = self._resident.get(name)
        if res is None:
            return True
        if res.pins:
            return False
        del self._resident[name]
        self.pool.free(res.pages)
        return True

    def prefetch(self, names: list[str], reserve_pages: int) -> None:
        """Load queued requests' adapters into free pages, keeping ``reserve_pages`` free."""
        for name in names:
            if name in self._resident or name not in self.store:
                continue
            if self.pool.num_free - self.pages_needed(name) < reserve_pages:
                return
            self.load(name, evict=False)
