"""Co-served fine-tune jobs through the job service and the gRPC API, on a real server.

A job submitted with CO_SERVE placement trains inside the serving engine while it serves,
serves its checkpoints while training, is registered in MLflow and served when it ends, and
gives the same adapter as the same job on the dedicated worker. A stopped service resumes
it from its checkpoint. Old job stores gain the placement column.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from google.protobuf import struct_pb2
from safetensors.torch import load_file

from adapterhub.finetune import FinetuneJob
from adapterhub.jobs import JobManager, JobState, JobStore, PlacementUnavailableError
from adapterhub.jobs.placement import resolve_placement
from adapterhub.train import TrainConfig
from adapterhub.v1 import adapters_pb2, finetune_pb2
from serving.api.backend import LocalBackend
from serving.cli import serve_finished
from serving.engine.coserve import CoserveConfig, CoServer
from serving.engine.coserve.job import EngineCoserving
from serving.engine.loop import EngineLoop
from tests.test_server_support import client, code_of, make_engine, request, serving

S = grpc.StatusCode
CO, DEDICATED, AUTO = (finetune_pb2.PLACEMENT_CO_SERVE, finetune_pb2.PLACEMENT_DEDICATED,
                       finetune_pb2.PLACEMENT_UNSPECIFIED)
OK = finetune_pb2.JOB_STATE_SUCCEEDED


def spec(name: str, placement: int = CO, steps: int = 3,
         **fields) -> finetune_pb2.FineTuneJobSpec:
    params = struct_pb2.Struct()
    params.update({"r": 4, "alpha": 8})
    s = finetune_pb2.FineTuneJobSpec(
        output_name=name, method="lora", method_params=params, placement=placement,
        training=finetune_pb2.TrainingParams(steps=steps, batch_size=4, max_length=32, lr=1e-2,
                                             checkpoint_every=1, seed=5))
    for i in range(12):
        rec = s.dataset.records.records.add()
        rec.prompt, rec.completion = f"q{i} {'ab' * (i % 5)}", f" a{i}"
    for key, value in fields.items():
        setattr(s, key, value)
    return s


def adapter_tensors(data_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(data_dir / "jobs" / name / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def engine(tiny_llama):
    engine = make_engine(tiny_llama, num_pages=4096, max_batched_tokens=64)
    engine.coserve = CoServer(engine, CoserveConfig(overlap=True))
    yield engine
    engine.coserve.close()


def test_grpc_coserved_job_trains_beside_inference_and_is_served(engine, tiny_llama, tmp_path):
    from adapterhub.registry import Registry

    data = tmp_path / "data"
    registry = Registry(data)
    manager = JobManager(tmp_path / "jobs.db", data, registry=registry,
                         base_model=str(tiny_llama), coserving=EngineCoserving(engine.coserve),
                         progress_interval=0.05)
    with serving(engine, jobs=manager, registry=registry, base_model=str(tiny_llama)) as srv, \
            client(srv) as c:
        manager.on_succeeded = serve_finished(srv.backend)
        manager.start()
        job = c.jobs.Submit(finetune_pb2.SubmitJobRequest(
            spec=spec("tuned", serve_checkpoints_as="tuned@latest")))
        assert job.placement == CO and job.spec.placement == CO
        served_while_training, stop = [], threading.Event()

        def traffic() -> None:  # inference keeps arriving while the job trains
            while not stop.is_set():
                c.inference.Generate(request("hello", max_tokens=4))
                try:
                    c.adapters.Get(adapters_pb2.GetAdapterRequest(name="tuned@latest"))
                    if not served_while_training:
                        served_while_training.append(
                            c.jobs.Get(finetune_pb2.GetJobRequest(id=job.id)).state)
                except grpc.RpcError:
                    pass

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            states = [j.state for j in c.jobs.Watch(finetune_pb2.WatchJobRequest(id=job.id),
                                                    timeout=120)]
        finally:
            stop.set()
            thread.join()
        final = c.jobs.Get(finetune_pb2.GetJobRequest(id=job.id))
        assert states[-1] == OK, final.error
        assert final.adapter_ref == "tuned/1" and final.mlflow_run_id
        assert final.placement == CO and final.metrics["train_tokens_per_s"] > 0
        assert "eval_loss" in final.metrics and "base_eval_loss" in final.metrics
        # A checkpoint was servable while the job was still running.
        assert served_while_training == [finetune_pb2.JOB_STATE_RUNNING]
        # Servable at once, by name (registered version) and as the latest checkpoint.
        assert c.adapters.Get(adapters_pb2.GetAdapterRequest(name="tuned")).source == "tuned/1"
        for name in ("tuned", "tuned@latest"):
            assert c.inference.Generate(request("q1", adapter=name)).usage.completion_tokens == 8

        # The same job on the dedicated worker trains the same adapter.
        auto = c.jobs.Submit(finetune_pb2.SubmitJobRequest(spec=spec("tuned-d", DEDICATED)))
        assert auto.placement == DEDICATED
        states = [j.state for j in c.jobs.Watch(finetune_pb2.WatchJobRequest(id=auto.id),
                                                timeout=120)]
        assert states[-1] == OK
        want, got = adapter_tensors(data, "tuned-d"), adapter_tensors(data, "tuned")
        assert set(want) == set(got)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4)
        manager.stop(30)
    assert engine.pool.stats().activation_pages == 0 and not engine.coserve.trainees


def test_placement_status_codes(engine, tiny_llama, tmp_path):
    plain = JobManager(tmp_path / "a.db", tmp_path / "a", base_model=str(tiny_llama))
    with serving(engine, jobs=plain, base_model=str(tiny_llama)) as srv, client(srv) as c:
        def submit(s):
            return c.jobs.Submit(finetune_pb2.SubmitJobRequest(spec=s))

        assert code_of(submit, spec("x")) == S.FAILED_PRECONDITION  # no co-serving here
        assert submit(spec("x", AUTO)).placement == DEDICATED
        assert code_of(submit, spec("x", AUTO, serve_checkpoints_as="x@latest")) == \
            S.FAILED_PRECONDITION
        assert code_of(submit, spec("x", placement=7)) == S.INVALID_ARGUMENT
    co = JobManager(tmp_path / "b.db", tmp_path / "b", base_model=str(tiny_llama),
                    coserving=EngineCoserving(engine.coserve))
    with serving(engine, jobs=co, base_model=str(tiny_llama)) as srv, client(srv) as c:
        def submit(s):
            return c.jobs.Submit(finetune_pb2.SubmitJobRequest(spec=s))

        assert submit(spec("y", AUTO)).placement == CO
        assert code_of(submit, spec("y", quantize="nf4")) == S.FAILED_PRECONDITION
        assert submit(spec("y", AUTO, quantize="nf4")).placement == DEDICATED
        assert code_of(submit, spec("y", serve_checkpoints_as="bad name!")) == \
            S.INVALID_ARGUMENT
        assert submit(spec("y", serve_checkpoints_as="y-preview")).spec.serve_checkpoints_as \
            == "y-preview"


class _Fake:
    def __init__(self, why: str | None) -> None:
        self.why = why

    def unavailable(self, spec):
        return self.why

    def backend(self, spec, interrupt):
        raise AssertionError("not used")


def test_resolve_placement():
    job = FinetuneJob(name="j")
    assert resolve_placement(job, None) == "dedicated"
    assert resolve_placement(job, _Fake(None)) == "co_serve"
    assert resolve_placement(job, _Fake("nf4")) == "dedicated"
    assert resolve_placement(replace(job, placement="dedicated"), _Fake(None)) == "dedicated"
    with pytest.raises(PlacementUnavailableError, match="nf4"):
        resolve_placement(replace(job, placement="co_serve"), _Fake("nf4"))
    with pytest.raises(PlacementUnavailableError, match="co-served"):
        resolve_placement(replace(job, serve_checkpoints_as="j@latest"), None)


_V1_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, spec TEXT NOT NULL,
    state TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL,
    loss REAL, tokens_per_s REAL, error TEXT, run_id TEXT, adapter_ref TEXT,
    metrics TEXT NOT NULL DEFAULT '{}', cancel_requested INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, revision INTEGER NOT NULL DEFAULT 1);
CREATE INDEX jobs_by_state ON jobs (state, seq);
PRAGMA user_version=1;
"""


def test_old_job_store_gains_the_placement_column(tmp_path):
    path = tmp_path / "old.db"
    old = FinetuneJob(name="old", task="reverse").to_dict()
    for key in ("placement", "serve_checkpoints_as"):  # a spec written before they existed
        old.pop(key)
    conn = sqlite3.connect(path)
    conn.executescript(_V1_SCHEMA)
    conn.execute("INSERT INTO jobs (id, spec, state, total_steps, created_at, updated_at)"
                 " VALUES ('job-old', ?, 'running', 200, 1.0, 1.0)", (json.dumps(old),))
    conn.commit()
    conn.close()
    store = JobStore(path)
    job = store.get("job-old")
    assert job.placement is None and job.state == JobState.RUNNING
    assert job.spec.placement == "auto" and job.spec.serve_checkpoints_as is None
    assert store.update("job-old", placement="dedicated").placement == "dedicated"
    new = store.insert(FinetuneJob(name="new"), placement="co_serve")
    assert store.get(new.id).placement == "co_serve"
    store.close()
    reopened = JobStore(path)  # already migrated: opens as is
    assert reopened.get("job-old").placement == "dedicated"
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == 2
    reopened.close()


def test_coserved_job_resumes_after_restart(engine, tiny_llama, tmp_path):
    from adapterhub.finetune import run_finetune

    data = tmp_path / "data"
    train = TrainConfig(steps=4, batch_size=4, max_length=32, lr=1e-2, checkpoint_every=2,
                        seed=5)
    job = FinetuneJob(name="resumed", base=str(tiny_llama), task=None, train=train,
                      placement="co_serve", eval_base=False)
    records = [{"prompt": f"q{i} {'ab' * (i % 5)}", "completion": f" a{i}"} for i in range(12)]
    loop = EngineLoop(engine, idle_wait_s=0.01)
    backend = LocalBackend(loop)
    try:
        first = JobManager(tmp_path / "jobs.db", data, base_model=str(tiny_llama),
                           coserving=EngineCoserving(engine.coserve), progress_interval=0.0)
        submitted = first.submit(job, records)
        first.start()
        for j in first.watch(submitted.id, timeout=120):
            if j.step >= 2:
                break
        assert first.stop(60)
        interrupted = first.get(submitted.id)
        assert interrupted.state == JobState.RUNNING and 2 <= interrupted.step < 4
        first.store.close()
        second = JobManager(tmp_path / "jobs.db", data, base_model=str(tiny_llama),
                            coserving=EngineCoserving(engine.coserve))
        second.start()
        final = list(second.watch(submitted.id, timeout=120))[-1]
        assert final.state == JobState.SUCCEEDED, final.error
        assert final.placement == "co_serve" and final.run_id == interrupted.run_id
        second.close(30)
    finally:
        backend.shutdown()
    # An uninterrupted dedicated run of the same job: the same adapter.
    spec = replace(final.spec, name="straight", placement="dedicated")
    run_finetune(spec, tmp_path / "data2", progress=False)
    want, got = adapter_tensors(tmp_path / "data2", "straight"), adapter_tensors(data, "resumed")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=1e-4)


def test_serve_options_attach_a_coserver(tiny_llama):
    import argparse

    from serving import cli
    from serving.engine.coserve.options import attach

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--coserve", "inline", "--coserve-min-share", "0.1",
                              "--coserve-tpot-slo-ms", "50"])
    engine = make_engine(tiny_llama)
    coserving = attach(engine, args)
    assert isinstance(coserving, EngineCoserving) and coserving.coserver is engine.coserve
    cfg = engine.coserve.config
    assert (cfg.overlap, cfg.min_share, cfg.tpot_slo_s, cfg.ttft_slo_s) == (False, 0.1, 0.05,
                                                                            None)
    assert parser.parse_args(["serve"]).coserve == "overlap"  # co-serving is the default
    off = make_engine(tiny_llama)
    assert attach(off, parser.parse_args(["serve", "--coserve", "off"])) is None
    assert off.coserve is None
