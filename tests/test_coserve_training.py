"""Co-serving trains what the Trainer trains, and leaves inference outputs untouched.

An adapter trained inside the engine's iterations (sliced micro-batches, inference traffic
interleaved, budgets varying, on the engine thread or a helper thread) equals the adapter
adapterhub's Trainer trains alone with the same data order, seed and hyper-parameters.
"""

from __future__ import annotations

import time

import pytest
import torch

from adapterhub.checkpoints import load_base
from adapterhub.train import Trainer
from serving.engine.coserve import CoserveConfig
from serving.engine.sampling import SamplingParams
from tests.coserve_support import (
    attach_job,
    coserve_engine,
    detach_all,
    records,
    run_until_done,
    seeded_adapter,
    train_config,
)
from tests.test_server_support import make_engine, make_lora


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return coserve_engine(tiny_llama)


@pytest.fixture(autouse=True)
def _clean(engine):
    yield
    detach_all(engine)  # which also checks that every activation page came back


def _reference(tiny_llama, method: str, **params):
    base, tok = load_base(tiny_llama)
    adapter = seeded_adapter(base, method, **params)
    trainer = Trainer(adapter, tok, records(), train_config(), progress=False)
    trainer.train()
    return adapter.adapter_state_dict(), [h["loss"] for h in trainer.history]


@pytest.mark.parametrize("method,helper,params", [
    ("lora", "inline", {}),
    ("lora", "thread", {}),
    ("lora", "process", {}),
    ("mos", "inline", {}),
    ("mos", "process", {}),
    ("hydra", "inline", {}),
    ("hydra", "process", {}),
    ("lora", "process", {"dropout": 0.2}),  # whole micro-batches inline, its own generator
])
def test_coserved_adapter_equals_trainer(engine, tiny_llama, method, helper, params):
    want, want_losses = _reference(tiny_llama, method, **params)
    config = (CoserveConfig(overlap=False) if helper == "inline"
              else CoserveConfig(overlap=True, helper=helper))
    coserver, trainee = attach_job(engine, method, config, **params)
    assert coserver.helper == ("thread" if helper == "inline" else helper)
    assert (trainee.remote is not None) == (helper == "process" and not params)
    losses = []
    steps = run_until_done(engine, [trainee], budgets=(8, 40, 200, 24), request_every=3)
    while not trainee.events.empty():
        kind, metrics, _ = trainee.events.get()
        if kind == "step":
            losses.append(metrics["loss"])
    got = trainee.adapter.adapter_state_dict()
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4, msg=key)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    micro_batches = 3 * 2
    if not params:
        assert trainee.slices > micro_batches  # micro-batches really were cut into slices
    assert steps > trainee.slices / 2 and engine.steps > 0


def test_dropout_changes_the_result(engine, tiny_llama):
    # Guards the test above: with dropout active, its equality is not trivially true.
    with_dropout, _ = _reference(tiny_llama, "lora", dropout=0.2)
    without, _ = _reference(tiny_llama, "lora")
    assert any(not torch.allclose(with_dropout[k], without[k]) for k in without)


@pytest.mark.parametrize("overlap", [False, True])
def test_inference_outputs_unchanged_beside_a_job(engine, tiny_llama, tmp_path, overlap):
    engine.register_adapter("served", make_lora(tiny_llama, tmp_path / "lora"))
    prompts = [[5 + i, 9, 12 + i, 7, 30, 31 - i] * (1 + i % 3) for i in range(6)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    adapters = ["served", None] * 3

    def run() -> tuple[list[list[int]], list[torch.Tensor]]:
        engine.runner.capture = {}
        outs = engine.generate(prompts, params, adapters)
        logits = [torch.cat(engine.runner.capture[o.request_id]) for o in outs]
        engine.runner.capture = None
        return [o.token_ids for o in outs], logits

    want_tokens, want_logits = run()
    coserver, trainee = attach_job(engine, "lora", CoserveConfig(overlap=overlap),
                                   train=train_config(steps=50))
    got_tokens, got_logits = run()
    # It trained meanwhile. With overlap the last slice may still be running on the helper
    # thread when generate() returns: wait for it rather than race it.
    deadline = time.monotonic() + 60
    while trainee.slices == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert trainee.slices > 0 and trainee.tokens_trained > 0
    assert got_tokens == want_tokens
    for got, want in zip(got_logits, want_logits, strict=True):
        assert torch.equal(got, want)


def test_activation_pages_reserved_during_a_slice_and_returned(engine):
    coserver, trainee = attach_job(engine, "lora", CoserveConfig(overlap=False),
                                   train=train_config(steps=2))
    free = engine.pool.num_free
    seen = []
    run = trainee.run

    def spy(k: int, measure: bool = False) -> int:
        seen.append(engine.pool.stats().activation_pages)
        return run(k, measure)

    trainee.run = spy
    run_until_done(engine, [trainee])
    assert seen and min(seen) > 0
    assert engine.pool.stats().activation_pages == 0 and engine.pool.num_free == free
    meter = next(iter(coserver._meters.values()), None)
    assert meter is None  # a finished job leaves the co-server


def test_short_pool_shrinks_slices_then_waits(engine):
    from serving.engine.pool import KV

    coserver, trainee = attach_job(engine, "lora", CoserveConfig(overlap=False),
                                   train=train_config(steps=1))
    while not trainee.slices:  # a first slice measures the activation bytes per token
        engine.step()
    meter = coserver._meters[id(trainee)]
    page_bytes = engine.pool.stats().page_bytes
    # Leave room for about one sequence: slices shrink to single sequences.
    keep = meter.pages(trainee.next_cost(), page_bytes) + engine.config.watermark_pages
    hog = engine.pool.alloc(engine.pool.num_free - keep, KV)
    before = trainee.slices
    sizes, run = [], trainee.run
    trainee.run = lambda k, measure=False: sizes.append(k) or run(k, measure)
    engine.scheduler.config.max_batched_tokens = 400  # the budget would allow more rows
    engine.step()
    assert trainee.slices == before + 1 and sizes == [1]
    # No room at all: the job waits, nothing breaks, no page is lent twice.
    hog += engine.pool.alloc(engine.pool.num_free, KV)
    for _ in range(3):
        engine.step()
    assert trainee.slices == before + 1 and coserver.memory_waits >= 3
    engine.pool.free(hog)
    run_until_done(engine, [trainee])
    assert trainee.state.value == "done"


def test_job_larger_than_the_pool_fails_alone(tiny_llama):
    small = make_engine(tiny_llama, num_pages=16, max_batched_tokens=64)
    _, trainee = attach_job(small, "lora", CoserveConfig(overlap=False))
    for _ in range(10):  # until its deficit covers a slice, which then does not fit
        small.step()
    assert trainee.state.value == "failed" and trainee.slices == 0
    kind, exc, _ = trainee.events.get_nowait()
    assert kind == "error" and isinstance(exc, MemoryError) and "pool pages" in str(exc)
    out = small.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(out[0].token_ids) == 3  # the engine serves on
