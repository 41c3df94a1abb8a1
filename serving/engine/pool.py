"""The unified paged pool (S-LoRA's Unified Paging): KV-cache pages and adapter weights.

One preallocated tensor of equal pages. KV pages are viewed through layout.py's shape; an
adapter's weights are laid out flat across as many pages as they need (any pages: no
contiguity, no padding to a maximum rank, at most one partly filled page per adapter).
Every page is free, KV, adapter or activation (reserved for the activations of a co-served
fine-tuning slice while it runs, see engine/coserve/); ``stats()`` reports the counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serving.engine.layout import ModelShape

KV, ADAPTER, ACTIVATION = "kv", "adapter", "activation"


class PoolExhausted(RuntimeError):
    """Not enough free pages (the scheduler evicts or preempts, never crashes)."""


@dataclass(frozen=True)
class PoolStats:
    total_pages: int
    free_pages: int
    kv_pages: int
    adapter_pages: int
    page_bytes: int
    activation_pages: int = 0


class UnifiedPool:
    def __init__(
        self,
        num_pages: int,
        shape: ModelShape,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_pages < 1 or block_size < 1:
            raise ValueError("the pool needs at least one page of at least one token")
        self.shape = shape
        self.block_size = block_size
        self.page_elems = shape.num_layers * 2 * block_size * shape.kv_dim
        # One page past the last is the null page: never handed out, always zero, what block
        # tables are padded with (attention reads it, so it must stay finite).
        self.storage = torch.zeros(num_pages + 1, self.page_elems, dtype=dtype, device=device)
        self.num_pages = num_pages
        self.null_page = num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._kind = [""] * num_pages
        self._used = {KV: 0, ADAPTER: 0, ACTIVATION: 0}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def kv_view(self) -> torch.Tensor:
        s = self.shape
        return self.storage.view(
            self.num_pages + 1, s.num_layers, 2, self.block_size, s.num_kv_heads, s.head_dim
        )

    def pages_for(self, elems: int) -> int:
        return -(-elems // self.page_elems)

    def alloc(self, n: int, kind: str, consecutive: bool = False) -> list[int]:
        """``consecutive``: take the lowest run of n consecutive free pages when there is one
        (an adapter's weights are then one view the LoRA kernel reads in place), else any."""
        if n > len(self._free):
            raise PoolExhausted(f"need {n} pages, {len(self._free)} free")
        lo = self._free_run(n) if consecutive and n > 1 else None
        if lo is not None:
            pages = list(range(lo, lo + n))
            self._free = [p for p in self._free if not lo <= p < lo + n]
        else:
            pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._kind[p] = kind
        self._used[kind] += n
        if kind == KV and pages:
            # Attention reads the unwritten slots of a sequence's last page (masked by position),
            # so they must be finite: whatever a freed page held before, zero it.
            self.storage.index_fill_(0, torch.tensor(pages, device=self.storage.device), 0)
        return pages

    def _free_run(self, n: int) -> int | None:
        run, prev = 0, -2
        for p in sorted(self._free):
            run = run + 1 if p == prev + 1 else 1
            prev = p
            if run == n:
                return p - n + 1
        return None

    def free(self, pages: list[int]) -> None:
        for p in pages:
            kind = self._kind[p]
            if not kind:
                raise RuntimeError(f"page {p} freed twice")
            self._kind[p] = ""
            self._used[kind] -= 1
            self._free.append(p)

    @staticmethod
    def is_run(pages: list[int]) -> bool:
        """Whether ``pages`` are one run, so that their contents are one view of the pool."""
        return bool(pages) and pages == list(range(pages[0], pages[0] + len(pages)))

    def write_flat(self, pages: list[int], flat: torch.Tensor) -> None:
        """Store a flat tensor across ``pages`` (the last page is zero-padded)."""
        if self.is_run(pages):  # in place
            dst = self.storage[pages[0]:pages[-1] + 1].view(-1)
            dst[:flat.numel()] = flat.reshape(-1)
            dst[flat.numel():] = 0
            return
        buf = torch.zeros(len(pages) * self.page_elems, dtype=self.storage.dtype,
                          device=self.storage.device)
        buf[: flat.numel()] = flat.reshape(-1).to(buf)
        index = torch.tensor(pages, device=self.storage.device)
        self.storage.index_copy_(0, index, buf.view(len(pages), self.page_elems))

    def read_flat(self, pages: list[int]) -> torch.Tensor:
        """``pages`` as one flat tensor, read-only: a view when they are consecutive (pages are
        handed out lowest first, so an adapter's usually are), else a copy of just these."""
        if self.is_run(pages):
            return self.storage[pages[0]:pages[-1] + 1].view(-1)
        index = torch.tensor(pages, device=self.storage.device)
        return self.storage.index_select(0, index).view(-1)

    def stats(self) -> PoolStats:
        return PoolStats(
            total_pages=self.num_pages,
            free_pages=len(self._free),
            kv_pages=self._used[KV],
            adapter_pages=self._used[ADAPTER],
            page_bytes=self.page_elems * self.storage.element_size(),
            activation_pages=self._used[ACTIVATION],
        )
