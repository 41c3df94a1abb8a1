"""Thousands of requests with random cancellations, deadlines, preemption and adapter churn:
every page comes back."""

from __future__ import annotations

import random
import time

import pytest
import torch

from serving.engine.adapter_store import build_host_adapter
from serving.engine.config import EngineConfig
from serving.engine.engine import Engine
from serving.engine.loop import EngineLoop
from serving.engine.sampling import SamplingParams
from tests.native_support import require_native


def _random_adapter(engine: Engine, name: str, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(engine.shape.num_layers):
        for module, (d_in, d_out) in engine.shape.module_dims().items():
            weights[(layer, module)] = (torch.randn(rank, d_in, generator=g) * 0.1,
                                        torch.randn(d_out, rank, generator=g) * 0.1, None)
    return build_host_adapter(name, weights, engine.shape)


def _engine(ckpt, num_pages: int) -> Engine:
    engine = Engine(EngineConfig(model=str(ckpt), num_pages=num_pages, block_size=4,
                                 max_batched_tokens=48, max_num_seqs=24))
    for i, rank in enumerate([1, 2, 4, 8] * 3):
        engine.register_adapter(f"a{i}", _random_adapter(engine, f"a{i}", rank, i))
    return engine


def test_thousands_of_requests_return_every_page(tiny_mistral):
    # A pool far too small for the load: forces adapter eviction and preemption.
    engine = _engine(tiny_mistral, num_pages=40)
    start = engine.pool.stats()
    assert start.free_pages == 40
    rng = random.Random(0)
    adapters = [None] + engine.store.names()
    live: list[str] = []
    finished: dict[str, str] = {}
    submitted = 0
    while submitted < 2000 or engine.has_unfinished():
        for _ in range(rng.randint(0, 12)):
            if submitted >= 2000:
                break
            params = SamplingParams(max_tokens=rng.randint(1, 10),
                                    temperature=rng.choice([0.0, 0.8]), top_k=rng.choice([0, 5]),
                                    top_p=rng.choice([1.0, 0.9]), seed=rng.choice([None, 1]),
                                    ignore_eos=True)
            deadline = rng.choice([None, None, None, 0.001, 0.05])
            prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 14)))
            live.append(engine.add_request(prompt, params, rng.choice(adapters), deadline))
            submitted += 1
        if live and rng.random() < 0.3:
            engine.abort(live.pop(rng.randrange(len(live))))
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.finish_reason
    assert len(finished) == 2000
    reasons = set(finished.values())
    assert {"length", "aborted", "deadline"} <= reasons, reasons
    assert engine.scheduler.preemptions > 0
    assert engine.cache.evictions > 0
    stats = engine.pool.stats()
    assert stats.kv_pages == 0
    engine.release_idle_adapters()
    assert engine.pool.stats().free_pages == start.free_pages


def test_cancel_from_another_thread_frees_pages(tiny_llama):
    engine = _engine(tiny_llama, num_pages=64)
    loop = EngineLoop(engine)
    try:
        handles = [loop.submit("abc" * 5, SamplingParams(max_tokens=100, ignore_eos=True),
                               adapter=f"a{i % 4}") for i in range(8)]
        deadline = loop.submit("late", SamplingParams(max_tokens=100, ignore_eos=True),
                               deadline_s=0.05)
        next(iter(handles[0].stream(timeout=10)))  # generation is under way
        for h in handles:
            h.cancel()
        results = [h.result(timeout=10) for h in handles]
        assert {r.finish_reason for r in results} == {"aborted"}
        assert deadline.result(timeout=10).finish_reason == "deadline"
        t0 = time.monotonic()
        while engine.pool.stats().kv_pages and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert engine.pool.stats().kv_pages == 0
    finally:
        loop.shutdown()


@pytest.mark.parametrize("worker", [False, True], ids=["kernel", "worker"])
def test_pool_reads_match_slot_buffers_through_eviction_and_fragmentation(tiny_mistral,
                                                                          monkeypatch, worker):
    """Adapters read in place from the pool (the native kernel, on the engine's thread or the
    LoRA worker's) give the tokens the torch operator over slot buffers gives, while a small
    pool evicts adapters, preempts sequences and fragments: some adapters then land on
    scattered pages and are read from a copy."""
    require_native()
    rng = random.Random(1)
    requests = [("".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 14))),
                 rng.choice([None] + [f"a{i}" for i in range(12)]), rng.randint(1, 8))
                for _ in range(150)]

    def run(native: bool) -> tuple[list[list[int]], Engine]:
        monkeypatch.setenv("ADAPTERHUB_NATIVE_KERNELS", "1" if native else "0")
        engine = _engine(tiny_mistral, num_pages=40)
        engine.runner.lora_worker = worker and native
        assert (engine.runner.native is not None) == native
        ids = [engine.add_request(p, SamplingParams(max_tokens=n, ignore_eos=True), a)
               for p, a, n in requests]
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    tokens[out.request_id] = out.token_ids
        return [tokens[i] for i in ids], engine

    pool_tokens, pooled = run(True)
    slot_tokens, _ = run(False)
    assert pool_tokens == slot_tokens
    assert pooled.cache.evictions > 0 and pooled.scheduler.preemptions > 0
    stats = pooled.stats()
    assert stats["lora_path"] == "pool pages, native kernel"
    assert 0 < stats["adapter_copies"] < stats["adapter_loads"]  # both ways of reading ran
    assert (stats["lora_worker"] is not None) == worker
    assert pooled.pool.stats().kv_pages == 0
    pooled.release_idle_adapters()
    assert pooled.pool.stats().free_pages == 40
