"""Unified pool and adapter residency: page accounting, LRU eviction, pinning, prefetch."""

from __future__ import annotations

import pytest
import torch

from serving.engine.adapter_cache import AdapterCache
from serving.engine.adapter_store import AdapterStore, build_host_adapter, unpack
from serving.engine.layout import ModelShape
from serving.engine.pool import ADAPTER, KV, PoolExhausted, UnifiedPool

SHAPE = ModelShape(num_layers=2, hidden_size=16, intermediate_size=32, num_heads=2,
                   num_kv_heads=1, head_dim=8, vocab_size=50)


def _adapter(name: str, rank: int, modules=("q_proj", "down_proj"), bias=False):
    dims = SHAPE.module_dims()
    w = {}
    for layer in range(SHAPE.num_layers):
        for m in modules:
            d_in, d_out = dims[m]
            w[(layer, m)] = (torch.randn(rank, d_in), torch.randn(d_out, rank),
                             torch.randn(d_out) if bias else None)
    return build_host_adapter(name, w, SHAPE), w


def test_pool_pages_by_kind_and_double_free():
    pool = UnifiedPool(10, SHAPE, block_size=2)
    kv = pool.alloc(3, KV)
    ad = pool.alloc(2, ADAPTER)
    s = pool.stats()
    assert (s.free_pages, s.kv_pages, s.adapter_pages) == (5, 3, 2)
    with pytest.raises(PoolExhausted):
        pool.alloc(6, KV)
    pool.free(kv + ad)
    assert pool.stats().free_pages == 10
    with pytest.raises(RuntimeError, match="twice"):
        pool.free(kv[:1])
    # Plus the null page block tables are padded with: attention reads it, nobody gets it.
    assert pool.kv_view().shape == (11, 2, 2, 2, 1, 8) and pool.null_page == 10


def test_kv_pages_are_handed_out_zeroed_and_the_null_page_never():
    """Attention reads the unwritten slots of a sequence's pages (masked by position), so a KV
    page must not carry what its last owner left there, NaN included."""
    pool = UnifiedPool(4, SHAPE, block_size=2)
    pages = pool.alloc(4, ADAPTER)
    pool.write_flat(pages, torch.full((4 * pool.page_elems,), float("nan")))
    pool.free(pages)
    kv = pool.alloc(4, KV)
    assert pool.null_page not in kv
    view = pool.kv_view()
    assert bool((view[kv] == 0).all()) and bool((view[pool.null_page] == 0).all())


def test_adapter_round_trips_through_pages_without_rank_padding():
    pool = UnifiedPool(64, SHAPE, block_size=2)
    store = AdapterStore()
    adapter, w = _adapter("a", rank=3, bias=True)
    store.put(adapter)
    cache = AdapterCache(pool, store)
    assert cache.load("a")
    res = cache.resident("a")
    # Exactly the pages its elements need: mixed ranks are not padded to a maximum.
    assert len(res.pages) == pool.pages_for(adapter.flat.numel())
    flat = pool.read_flat(res.pages)
    for key, (A, B, bias) in w.items():
        gA, gB, gbias = unpack(flat, adapter.layout[key])
        torch.testing.assert_close(gA, A)
        torch.testing.assert_close(gB, B)
        torch.testing.assert_close(gbias, bias)


@pytest.mark.parametrize("pages", [[3, 4, 5], [5, 2, 9]], ids=["consecutive", "scattered"])
def test_flat_reads_back_what_was_written(pages):
    pool = UnifiedPool(10, SHAPE, block_size=2)
    flat = torch.randn(3 * pool.page_elems - 5)
    pool.write_flat(pages, flat)
    back = pool.read_flat(pages)
    torch.testing.assert_close(back[:flat.numel()], flat, atol=0, rtol=0)
    assert bool((back[flat.numel():] == 0).all())
    # Consecutive pages are read in place (no copy of the adapter per slot load).
    assert (back.data_ptr() == pool.storage[pages[0]].data_ptr()) == (pages == [3, 4, 5])


def test_lru_eviction_respects_pins_and_prefetch_keeps_reserve():
    store = AdapterStore()
    for i in range(4):
        store.put(_adapter(f"a{i}", rank=8)[0])
    per = UnifiedPool(1, SHAPE, block_size=2).pages_for(store.get("a0").flat.numel())
    pool = UnifiedPool(per * 3, SHAPE, block_size=2)
    cache = AdapterCache(pool, store)
    for name in ("a0", "a1", "a2"):
        assert cache.load(name)
    cache.pin("a0")
    cache.touch("a1")  # a2 is now the least recently used unpinned adapter
    assert cache.load("a3")
    assert cache.resident_names() == ["a0", "a1", "a3"]
    cache.pin("a1")
    cache.pin("a3")
    assert not cache.load("a2")  # everything resident is pinned
    for name in ("a0", "a1", "a3"):
        cache.unpin(name)
    assert cache.drop("a3") and pool.num_free == per
    cache.prefetch(["a2"], reserve_pages=1)  # would leave no page free: skipped
    assert not cache.is_resident("a2")
    cache.prefetch(["a2"], reserve_pages=0)
    assert cache.is_resident("a2") and pool.num_free == 0


def test_invalid_adapter_weights_are_refused():
    from adapterhub.errors import AdapterError, IncompatibleAdapterError

    dims = SHAPE.module_dims()
    d_in, d_out = dims["q_proj"]
    with pytest.raises(IncompatibleAdapterError, match="layers.0.q_proj"):
        build_host_adapter("x", {(0, "q_proj"): (torch.randn(2, d_in + 1),
                                                 torch.randn(d_out, 2), None)}, SHAPE)
    with pytest.raises(IncompatibleAdapterError, match="lacks"):
        build_host_adapter("x", {(5, "q_proj"): (torch.randn(2, d_in),
                                                 torch.randn(d_out, 2), None)}, SHAPE)
    bad = torch.randn(2, d_in)
    bad[0, 0] = float("inf")
    with pytest.raises(AdapterError, match="non-finite"):
        build_host_adapter("x", {(0, "q_proj"): (bad, torch.randn(d_out, 2), None)}, SHAPE)
