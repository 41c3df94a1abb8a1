"""The LoRA worker thread: deltas computed beside the engine's thread, joined per module."""

from __future__ import annotations

import os
import time

import pytest
import torch

from serving.engine import kernels
from serving.engine.lora_worker import LoraWorker, spare_core
from tests.native_support import native_lib, require_native


@pytest.fixture(autouse=True)
def native():
    require_native()


@pytest.fixture
def worker():
    w = LoraWorker(native_lib(kernels.lora_worker_lib), torch.float32)
    yield w
    w.close()


def _adapter_rows(n_tokens: int, d_in: int, d_out: int, rank: int, seed: int):
    """Per token its own adapter: A [r, d_in] then B^T [r, d_out], one flat tensor each, and
    the kernel's [4, T] table pointing at them."""
    g = torch.Generator().manual_seed(seed)
    flats = [torch.randn(rank * (d_in + d_out), generator=g) / d_in**0.5
             for _ in range(n_tokens)]
    ranks = [rank if t % 3 else 0 for t in range(n_tokens)]  # every third token bare
    a = torch.tensor([f.data_ptr() for f in flats])
    where = torch.stack([a, a + rank * d_in * 4, torch.zeros_like(a), torch.tensor(ranks)])
    return flats, where.contiguous(), ranks


def _expected(x, flats, ranks, d_in, d_out):
    out = torch.zeros(x.shape[0], d_out, dtype=torch.float64)
    for t, (f, r) in enumerate(zip(flats, ranks, strict=True)):
        if r:
            A = f[: r * d_in].view(r, d_in).double()
            Bt = f[r * d_in:].view(r, d_out).double()
            out[t] = (A @ x[t].double()) @ Bt
    return out


def test_a_group_job_adds_each_modules_deltas_into_its_own_output(worker):
    """Three modules reading one x (q, k, v) as one job; joined one by one after a pause that
    stands for the base GEMMs, during which the worker thread takes the chunks."""
    T, d_in, widths = 9, 24, (24, 8, 8)
    x = torch.randn(T, d_in)
    tables = [_adapter_rows(T, d_in, d, rank, seed) for seed, (d, rank) in
              enumerate(zip(widths, (4, 2, 6), strict=True))]
    worker.submit(x, [w for _, w, _ in tables], list(widths))
    assert worker.pending
    time.sleep(0.05)
    for i, ((flats, _, ranks), d) in enumerate(zip(tables, widths, strict=True)):
        y0 = torch.randn(T, d)
        y = worker.join(i, y0.clone())
        torch.testing.assert_close(y.double() - y0.double(),
                                   _expected(x, flats, ranks, d_in, d), atol=1e-5, rtol=1e-5)
    assert not worker.pending
    stats = worker.stats()
    assert stats["worker_chunks"] + stats["caller_chunks"] == 3 * 5  # 5 chunks of 2 tokens
    assert stats["worker_chunks"] > 0  # the pause let the thread do the work


def test_join_right_away_computes_what_the_worker_has_not_taken(worker):
    """No pause: the engine's thread claims whatever the worker has not, so a join never waits
    for a worker that did not start; the deltas are the same, whoever computed them."""
    T, d_in, d_out = 64, 32, 48
    x = torch.randn(T, d_in)
    flats, where, ranks = _adapter_rows(T, d_in, d_out, 8, seed=3)
    for _ in range(20):
        worker.submit(x, [where], [d_out])
        y = worker.join(0, torch.zeros(T, d_out))
        torch.testing.assert_close(y.double(), _expected(x, flats, ranks, d_in, d_out),
                                   atol=1e-5, rtol=1e-5)
    stats = worker.stats()
    assert stats["worker_chunks"] + stats["caller_chunks"] == 20 * 32


def test_bfloat16_output_is_rounded_once():
    w = LoraWorker(native_lib(kernels.lora_worker_lib), torch.bfloat16)
    try:
        T, d_in, d_out, r = 6, 16, 16, 4
        g = torch.Generator().manual_seed(0)
        flat = (torch.randn(r * (d_in + d_out), generator=g) / 4).bfloat16()
        a = flat.data_ptr()
        where = torch.tensor([[a] * T, [a + r * d_in * 2] * T, [0] * T, [r] * T])
        x = torch.randn(T, d_in, generator=g).bfloat16()
        y0 = torch.randn(T, d_out, generator=g).bfloat16()
        w.submit(x, [where], [d_out])
        y = w.join(0, y0.clone())
        A = flat[: r * d_in].view(r, d_in).double()
        Bt = flat[r * d_in:].view(r, d_out).double()
        exact = y0.double() + (x.double() @ A.T) @ Bt
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.double(), exact, atol=1e-6, rtol=2**-8 + 1e-6)
    finally:
        w.close()


def test_misuse_is_refused_and_the_worker_stays_usable(worker):
    T, d_in, d_out = 4, 8, 8
    x = torch.randn(T, d_in)
    flats, where, ranks = _adapter_rows(T, d_in, d_out, 2, seed=5)
    with pytest.raises(RuntimeError, match="no LoRA job"):
        worker.join(0, torch.zeros(T, d_out))
    with pytest.raises(ValueError, match="do not match"):
        worker.submit(x.bfloat16(), [where], [d_out])  # a float32 worker
    with pytest.raises(ValueError, match="do not match"):
        worker.submit(x, [where[:, :2].contiguous()], [d_out])  # table of other tokens
    with pytest.raises(ValueError, match="do not match"):
        worker.submit(x, [where] * 5, [d_out] * 5)  # more modules than a job holds
    worker.submit(x, [where], [d_out])
    with pytest.raises(RuntimeError, match="already outstanding"):
        worker.submit(x, [where], [d_out])
    with pytest.raises(ValueError, match="does not match"):
        worker.join(0, torch.zeros(T, d_out + 1))
    assert not worker.pending  # the refused join ended the job
    worker.submit(x, [where, where], [d_out, d_out])
    worker.join(0, torch.zeros(T, d_out))
    worker.finish()  # a forward that failed before module 1: the job ends anyway
    assert not worker.pending
    worker.submit(x, [where], [d_out])
    y = worker.join(0, torch.zeros(T, d_out))
    torch.testing.assert_close(y.double(), _expected(x, flats, ranks, d_in, d_out),
                               atol=1e-5, rtol=1e-5)


def test_close_ends_an_outstanding_job_and_is_idempotent():
    w = LoraWorker(native_lib(kernels.lora_worker_lib), torch.float32)
    T = 8
    flats, where, _ = _adapter_rows(T, 8, 8, 2, seed=6)
    w.submit(torch.randn(T, 8), [where], [8])
    w.close()
    w.close()
    assert w.stats() == {"worker_chunks": 0, "caller_chunks": 0}  # closed: nothing to read


def test_auto_needs_a_core_beyond_torchs_threads(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores)
    assert not spare_core()
    assert LoraWorker.maybe(None, torch.float32) is None
    assert LoraWorker.maybe(False, torch.float32) is None
    monkeypatch.setattr(torch, "get_num_threads", lambda: cores - 1)
    assert spare_core() == (cores > 1)
    forced = LoraWorker.maybe(True, torch.float32)
    assert forced is not None
    forced.close()
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        LoraWorker(native_lib(kernels.lora_worker_lib), torch.float16)
