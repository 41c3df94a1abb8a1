"""Persistent slot buffers: same deltas as packing the step's adapters, copies only on arrival."""

from __future__ import annotations

import random

import pytest
import torch

from serving.engine import lora_slots
from serving.engine.adapter_store import build_host_adapter
from serving.engine.layout import TARGET_MODULES, ModelShape
from serving.engine.lora_op import LoraBatchMeta, lora_delta, pack_lora_weights
from serving.engine.lora_slots import LoraSlots

SHAPE = ModelShape(num_layers=2, hidden_size=32, intermediate_size=64, num_heads=4,
                   num_kv_heads=2, head_dim=8, vocab_size=50)


def _adapter(name: str, rank: int, seed: int, modules=TARGET_MODULES, bias: bool = False,
             small_rank_module: str | None = None):
    g = torch.Generator().manual_seed(seed)
    dims = SHAPE.module_dims()
    weights = {}
    for layer in range(SHAPE.num_layers):
        for m in modules:
            r = 2 if m == small_rank_module else rank
            d_in, d_out = dims[m]
            weights[(layer, m)] = (torch.randn(r, d_in, generator=g),
                                   torch.randn(d_out, r, generator=g),
                                   torch.randn(d_out, generator=g) if bias else None)
    return build_host_adapter(name, weights, SHAPE)


def _reference(adapters, token_names, x_by_key):
    """Pack just this step's adapters (the old per-step path) and apply it."""
    names = sorted({n for n in token_names if n})
    slot = {n: i for i, n in enumerate(names)}
    by_name = {a.name: a for a in adapters}
    slots = [slot.get(n, -1) for n in token_names]
    meta = LoraBatchMeta.build(slots, [by_name[n].max_rank for n in names])
    from serving.engine.adapter_store import unpack
    out = {}
    for key, x in x_by_key.items():
        per = [unpack(by_name[n].flat, by_name[n].layout[key]) if key in by_name[n].layout
               else None for n in names]
        if all(p is None for p in per):
            out[key] = torch.zeros(x.shape[0], SHAPE.module_dims()[key[1]][1])
            continue
        out[key] = lora_delta(x, pack_lora_weights(per), meta)
    return out


def _slots_delta(slots: LoraSlots, adapters, token_names, x_by_key):
    names = sorted({n for n in token_names if n})
    by_name = {a.name: a for a in adapters}
    slot_of = slots.assign([by_name[n] for n in names], lambda a: a.flat)
    meta = LoraBatchMeta.build([slot_of.get(n, -1) if n else -1 for n in token_names],
                               slots.ranks)
    return {key: lora_delta(x, slots.weights[key], meta) for key, x in x_by_key.items()}


@pytest.fixture(params=[False, True], ids=["empty", "nan-poisoned"])
def poison(request, monkeypatch):
    """Fresh store rows hold NaN: a read of capacity no adapter wrote shows in the deltas."""
    monkeypatch.setattr(lora_slots, "POISON", request.param)


def test_matches_per_step_packing_through_churn_growth_and_replacement(poison):
    rng = random.Random(0)
    pool = [_adapter(f"r{r}-{i}", r, seed=r * 100 + i) for r in (8, 4, 2) for i in range(6)]
    pool.append(_adapter("qv-only", 4, seed=7, modules=("q_proj", "v_proj")))
    pool.append(_adapter("biased", 8, seed=8, bias=True))
    pool.append(_adapter("patterned", 8, seed=9, small_rank_module="up_proj"))
    slots = LoraSlots(SHAPE, torch.float32, "cpu", max_slots_per_bin=8, initial_slots=2)
    keys = [(layer, m) for layer in range(SHAPE.num_layers) for m in TARGET_MODULES]
    dims = SHAPE.module_dims()
    for step in range(25):
        if step == 12:  # the store replaced an adapter under the same name: copied again
            pool[0] = _adapter(pool[0].name, 8, seed=999)
        active = rng.sample(pool, rng.randint(1, 6))
        tokens = [rng.choice(active).name if rng.random() < 0.85 else None
                  for _ in range(rng.randint(1, 12))]
        x_by_key = {k: torch.randn(len(tokens), dims[k[1]][0]) for k in keys}
        want = _reference(active, tokens, x_by_key)
        got = _slots_delta(slots, active, tokens, x_by_key)
        for k in keys:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-4)
    assert slots.relayouts >= 2  # bins were created and grew, contents carried over
    assert 0 < slots.relayouts_in_place < slots.relayouts  # blocks moved within the stores


def test_steady_batch_copies_nothing_and_lru_replaces_idle_slots():
    a, b, c = (_adapter(n, 4, seed=i) for i, n in enumerate("abc"))
    slots = LoraSlots(SHAPE, torch.float32, "cpu", max_slots_per_bin=2, initial_slots=2)
    read_calls = []

    def read(ad):
        read_calls.append(ad.name)
        return ad.flat

    slots.assign([a, b], read)
    for _ in range(5):
        slots.assign([a, b], read)
    assert read_calls == ["a", "b"] and slots.copies == 2
    slots.assign([a], read)  # b idle, a used more recently
    slots.assign([c], read)  # full bin: c takes the least recently used slot (b's)
    assert read_calls[-1] == "c" and slots.slots_in_use() == 2
    slots.assign([a], read)
    assert read_calls[-1] == "c"  # a kept its slot
    slots.assign([b], read)
    assert read_calls[-1] == "b"


def test_a_step_wider_than_the_bin_cap_is_refused():
    slots = LoraSlots(SHAPE, torch.float32, "cpu", max_slots_per_bin=2)
    adapters = [_adapter(f"x{i}", 4, seed=i) for i in range(3)]
    try:
        slots.assign(adapters, lambda a: a.flat)
    except RuntimeError as exc:
        assert "more than 2 adapters of rank 4" in str(exc)
    else:
        raise AssertionError("expected a refusal")


def test_cpu_bins_start_at_their_cap_and_only_written_slots_count():
    """On CPU a bin's capacity is untouched address space until an adapter takes a slot: a bin
    never grows (no relayout per growth), and memory counts only the slots written."""
    slots = LoraSlots(SHAPE, torch.float32, "cpu", max_slots_per_bin=8)
    adapters = [_adapter(f"x{i}", 4, seed=i) for i in range(6)]
    slots.assign(adapters[:2], lambda a: a.flat)
    one = slots.nbytes
    slots.assign(adapters, lambda a: a.flat)
    assert slots.relayouts == 1 and len(slots.ranks) == 8
    assert slots.nbytes == 3 * one  # 6 slots written of 8


def test_refused_headroom_falls_back_to_a_store_the_size_of_the_layout(monkeypatch):
    """Where memory for a store's headroom is refused, the store is sized to the layout and
    serving goes on."""
    real = lora_slots._fresh
    sizes = []
    layout_rows = 8 * 4 + 8 * 1  # two bins of 8 slots, ranks 4 and 1

    def fresh(rows, cols, dtype, device):
        sizes.append(rows)
        if rows > layout_rows:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real(rows, cols, dtype, device)

    monkeypatch.setattr(lora_slots, "_fresh", fresh)
    slots = LoraSlots(SHAPE, torch.float32, "cpu", max_slots_per_bin=8)
    adapters = [_adapter(f"x{i}", 4, seed=i) for i in range(3)]
    slots.assign(adapters, lambda a: a.flat)
    adapters.append(_adapter("y", 1, seed=9))  # a new bin: the store grows with headroom
    slot_of = slots.assign(adapters, lambda a: a.flat)
    assert max(sizes) > layout_rows  # the headroom was asked for and refused
    assert all(w.A.shape[0] == layout_rows for w in slots.weights.values())
    assert sorted(slot_of.values()) == [0, 1, 2, 8]
