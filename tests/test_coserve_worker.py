"""The worker process that computes overlapped fine-tuning slices on CPU: a failure in it
fails the job it was running and never the engine, it is restarted for the next job, it
holds no job once jobs are detached, and without room in /dev/shm co-serving falls back to
the helper thread."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from serving.engine.coserve import CoserveConfig
from serving.engine.coserve import coserver as coserver_module
from serving.engine.pool import ACTIVATION
from serving.engine.sampling import SamplingParams
from tests.coserve_support import (
    attach_job,
    coserve_engine,
    detach_all,
    run_until_done,
    train_config,
)
from tests.test_server_support import make_engine

PROCESS = CoserveConfig(overlap=True, helper="process")


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return coserve_engine(tiny_llama)


@pytest.fixture(autouse=True)
def _clean(engine):
    yield
    detach_all(engine)  # which also checks that every activation page came back


def _step_until(engine, cond, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        engine.step()


def test_worker_death_fails_its_job_and_the_engine_goes_on(engine):
    coserver, trainee = attach_job(engine, "lora", PROCESS, train=train_config(steps=500))
    _step_until(engine, lambda: trainee.slices >= 2)
    os.kill(coserver.worker.pid, signal.SIGKILL)
    _step_until(engine, lambda: trainee.state.value == "failed")
    kind, exc, _ = trainee.events.get_nowait()
    while kind != "error":
        kind, exc, _ = trainee.events.get_nowait()
    assert "worker process exited" in str(exc)
    # Inference is untouched, and the activation pages of the lost slice came back.
    out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    _step_until(engine, lambda: not coserver.has_work())
    assert engine.pool.stats().activation_pages == 0
    # The next job gets a new worker and trains to the end.
    _, second = attach_job(engine, "lora", coserver=coserver, name="second",
                           train=train_config(steps=2))
    run_until_done(engine, [second])
    assert second.state.value == "done" and coserver.worker.alive()


def test_an_error_in_the_worker_fails_the_slice_not_the_worker(engine):
    coserver, trainee = attach_job(engine, "lora", PROCESS, train=train_config(steps=2))
    bad = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}  # no attention mask, no labels
    with pytest.raises(RuntimeError, match="failed in the worker: KeyError"):
        trainee.remote.backward(bad, 1.0, False)
    run_until_done(engine, [trainee])
    assert trainee.state.value == "done"


def test_detached_jobs_leave_the_worker(engine):
    coserver, first = attach_job(engine, "lora", PROCESS, train=train_config(steps=50))
    _, second = attach_job(engine, "hydra", coserver=coserver, name="second",
                           train=train_config(steps=50))
    _step_until(engine, lambda: first.slices and second.slices)
    assert coserver.worker.jobs() == 2
    coserver.detach(first)
    assert coserver.worker.jobs() == 1
    detach_all(engine)
    assert coserver.worker.jobs() == 0


def test_without_room_in_dev_shm_slices_run_on_the_helper_thread(tiny_llama, monkeypatch, caplog):
    fresh = make_engine(tiny_llama, num_pages=4096, max_batched_tokens=64)  # weights unshared
    monkeypatch.setattr(coserver_module, "shm_room", lambda: 1024)
    coserver, trainee = attach_job(fresh, "lora", CoserveConfig(overlap=True),
                                   train=train_config(steps=2))
    assert coserver.helper == "thread" and trainee.remote is None
    assert "/dev/shm" in caplog.text
    assert not any(p.is_shared() for p in fresh.runner.model.parameters())
    run_until_done(fresh, [trainee])
    assert trainee.state.value == "done"
    detach_all(fresh)


def test_a_model_that_does_not_pickle_trains_on_the_helper_thread(engine, caplog):
    coserver, trainee = attach_job(engine, "lora", PROCESS, train=train_config(steps=2))
    trainee.adapter.not_picklable = lambda: None  # a local function: pickle refuses it
    run_until_done(engine, [trainee])
    assert trainee.state.value == "done" and trainee.remote is None
    assert "cannot be sent to the worker" in caplog.text
    assert coserver.worker.alive()  # nothing half-sent reached it


def test_a_lone_jobs_helper_slice_goes_on_while_bank_and_pages_allow(engine):
    coserver, trainee = attach_job(engine, "lora", PROCESS, train=train_config(steps=3))
    # Plan one helper slice the way begin() does, with pages for the costliest micro-batch.
    widest = trainee.config.batch_size * max(trainee.lengths)
    [s] = coserver._plan(widest, helper_free=True)
    page_bytes = engine.pool.page_elems * engine.pool.storage.element_size()
    engine.pool.free(s.pages)
    s.pages = engine.pool.alloc(s.meter.pages(widest, page_bytes), ACTIVATION)
    coserver._bank = 10 * widest
    coserver._run(s, chain=True)
    # One call ran every micro-batch (3 steps x 2) to the end, paid from the bank.
    assert trainee.state.value == "done" and trainee.slices == coserver.slices >= 6
    assert coserver.chained == coserver.slices - 1 and coserver._bank < 10 * widest
    coserver._free_done()
    assert engine.pool.stats().activation_pages == 0


def test_no_chaining_past_the_bank(engine):
    coserver, trainee = attach_job(engine, "lora", PROCESS, train=train_config(steps=3))
    [s] = coserver._plan(10**6, helper_free=True)
    coserver._bank = 0
    coserver._run(s, chain=True)
    assert coserver.chained == 0 and trainee.slices == 1
    run_until_done(engine, [trainee])


def test_an_unknown_helper_is_refused():
    with pytest.raises(ValueError, match="helper must be auto, process or thread, got 'gpu'"):
        CoserveConfig(helper="gpu")


def test_a_worker_running_other_code_says_so(monkeypatch):
    """A worker respawned after the installed files changed under a running engine imports the
    new code: it refuses every request with a clear message instead of misreading them."""
    from serving.engine.coserve import worker as worker_module
    monkeypatch.setattr(worker_module, "PROTOCOL", "engine-code")
    w = worker_module.SliceWorker(threads=1)
    w.ensure_started()
    try:
        with pytest.raises(RuntimeError, match="installed files changed under a running server"):
            w.jobs()
        assert w.alive()
    finally:
        w.close()
    assert not w.alive()


def test_the_lora_worker_stands_aside_while_a_slice_has_the_spare_core(tiny_llama):
    """An overlapped fine-tuning slice computes on the core the engine's LoRA worker would use:
    while one is in flight the step's LoRA deltas stay on the engine's thread, and the worker
    takes them again once fine-tuning is done."""
    from serving.engine.adapter_store import build_host_adapter
    from serving.engine.lora_pool import PoolLoraContext
    from tests.native_support import require_native

    require_native()
    engine = coserve_engine(tiny_llama)
    engine.runner.lora_worker = True
    g = torch.Generator().manual_seed(0)
    weights = {(layer, m): (torch.randn(4, d_in, generator=g) * 0.1,
                            torch.randn(d_out, 4, generator=g) * 0.1, None)
               for layer in range(engine.shape.num_layers)
               for m, (d_in, d_out) in engine.shape.module_dims().items()}
    engine.register_adapter("served", build_host_adapter("served", weights, engine.shape))
    seen: list[tuple[bool, bool]] = []  # (slice in flight, worker handed to the step)
    build = engine.runner._pool_lora

    def spy(*args, **kwargs):
        ctx = build(*args, **kwargs)
        if isinstance(ctx, PoolLoraContext):
            busy = engine.coserve is not None and engine.coserve.helper_busy()
            seen.append((busy, ctx.worker is not None))
        return ctx

    engine.runner._pool_lora = spy
    params = SamplingParams(max_tokens=3, ignore_eos=True)
    _, trainee = attach_job(engine, config=CoserveConfig(overlap=True, helper="thread"))
    deadline = time.monotonic() + 120
    while trainee.state.value == "running" or trainee.busy:
        engine.add_request([5, 6, 7, 8], params, "served")
        engine.step()
        assert time.monotonic() < deadline, "fine-tuning made no progress"
    while engine.has_unfinished():
        engine.step()
    detach_all(engine)
    engine.generate([[5, 6, 7]], params, adapters=["served"])
    assert any(busy for busy, _ in seen), "no step overlapped a slice"
    assert all(not worker for busy, worker in seen if busy)
    assert seen[-1] == (False, True)
    engine.runner.close()
