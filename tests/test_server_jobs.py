"""FineTuneService over a real JobManager, and `adapterhub serve` end to end: a job submitted
over gRPC trains, registers, and its adapter is served at once without a restart."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
import urllib.request

import grpc
import pytest
from google.protobuf import struct_pb2

from adapterhub.jobs import JobManager
from adapterhub.v1 import adapters_pb2, finetune_pb2
from tests.test_server_support import client, code_of, make_engine, request, serving

S = grpc.StatusCode
Q, R, OK, CANCELLED = (finetune_pb2.JOB_STATE_QUEUED, finetune_pb2.JOB_STATE_RUNNING,
                       finetune_pb2.JOB_STATE_SUCCEEDED, finetune_pb2.JOB_STATE_CANCELLED)


def spec(name: str = "tuned", n: int = 12, **fields) -> finetune_pb2.FineTuneJobSpec:
    params = struct_pb2.Struct()
    params.update({"r": 4, "alpha": 8})
    s = finetune_pb2.FineTuneJobSpec(
        output_name=name, method="lora", method_params=params,
        training=finetune_pb2.TrainingParams(steps=2, batch_size=4, max_length=32, lr=1e-2))
    for i in range(n):
        rec = s.dataset.records.records.add()
        rec.prompt, rec.completion = f"q{i} ", f"a{i}"
    for key, value in fields.items():
        setattr(s, key, value) if not isinstance(value, list) else getattr(s, key).extend(value)
    return s


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama)


@pytest.fixture
def jobs_client(engine, tiny_llama, tmp_path):
    (tmp_path / "allowed").mkdir()
    manager = JobManager(tmp_path / "jobs.db", tmp_path / "data", base_model=str(tiny_llama),
                         allowed_dataset_roots=[tmp_path / "allowed"])
    # Not started: jobs stay queued, which is all the RPC contract needs.
    with serving(engine, jobs=manager, base_model=str(tiny_llama)) as srv, client(srv) as c:
        yield c, tmp_path


def test_submit_get_list_watch_cancel(jobs_client):
    c, _ = jobs_client
    job = c.jobs.Submit(finetune_pb2.SubmitJobRequest(spec=spec(aliases=["prod"])))
    assert job.id and job.state == Q and job.spec.output_name == "tuned"
    assert job.spec.method_params["r"] == 4 and job.spec.training.steps == 2
    assert list(job.spec.aliases) == ["prod"]
    assert c.jobs.Get(finetune_pb2.GetJobRequest(id=job.id)).id == job.id
    other = c.jobs.Submit(finetune_pb2.SubmitJobRequest(spec=spec("second")))
    listed = c.jobs.List(finetune_pb2.ListJobsRequest())
    assert {j.id for j in listed.jobs} == {job.id, other.id}
    assert not c.jobs.List(finetune_pb2.ListJobsRequest(states=[OK])).jobs
    assert len(c.jobs.List(finetune_pb2.ListJobsRequest(states=[Q, R])).jobs) == 2

    watch = c.jobs.Watch(finetune_pb2.WatchJobRequest(id=job.id), timeout=30)
    assert next(watch).state == Q
    threading.Timer(0.2, c.jobs.Cancel, args=(finetune_pb2.CancelJobRequest(id=job.id),)).start()
    assert [j.state for j in watch] == [CANCELLED]
    assert code_of(c.jobs.Cancel, finetune_pb2.CancelJobRequest(id=job.id)) == \
        S.FAILED_PRECONDITION
    assert [j.state for j in c.jobs.Watch(finetune_pb2.WatchJobRequest(id=job.id))] == \
        [CANCELLED]


def test_job_status_codes(jobs_client, tiny_qwen2):
    c, tmp = jobs_client
    for rpc, req in ((c.jobs.Get, finetune_pb2.GetJobRequest(id="nope")),
                     (c.jobs.Cancel, finetune_pb2.CancelJobRequest(id="nope")),
                     (lambda r: list(c.jobs.Watch(r)), finetune_pb2.WatchJobRequest(id="nope"))):
        assert code_of(rpc, req) == S.NOT_FOUND
    assert code_of(c.jobs.Get, finetune_pb2.GetJobRequest()) == S.INVALID_ARGUMENT
    assert code_of(c.jobs.List, finetune_pb2.ListJobsRequest(states=[0])) == S.INVALID_ARGUMENT

    def submit(s: finetune_pb2.FineTuneJobSpec) -> grpc.StatusCode:
        return code_of(c.jobs.Submit, finetune_pb2.SubmitJobRequest(spec=s))

    no_data = spec()
    no_data.ClearField("dataset")
    bad_params = spec()
    bad_params.method_params.update({"r": -1})
    unknown_param = spec()
    unknown_param.method_params.update({"rank_of_doom": 3})
    (tmp / "allowed" / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n' * 12)
    inside, outside = spec(), spec()
    inside.dataset.path = str(tmp / "allowed" / "t.jsonl")
    outside.dataset.path = "/etc/passwd"
    bad_lr = spec()
    bad_lr.training.lr = float("nan")
    huge_seed = spec()
    huge_seed.training.seed = 2**64 - 1
    for s, code in [
        (no_data, S.INVALID_ARGUMENT),
        (spec(""), S.INVALID_ARGUMENT),
        (spec("bad name!"), S.INVALID_ARGUMENT),
        (spec(method="dora"), S.INVALID_ARGUMENT),
        (bad_params, S.INVALID_ARGUMENT),
        (unknown_param, S.INVALID_ARGUMENT),
        (bad_lr, S.INVALID_ARGUMENT),
        (huge_seed, S.INVALID_ARGUMENT),
        (spec(n=3), S.INVALID_ARGUMENT),  # too few records to hold some out
        (spec(quantize="int3"), S.INVALID_ARGUMENT),
        (spec(aliases=["latest"]), S.INVALID_ARGUMENT),
        (spec(base_model=str(tiny_qwen2)), S.INVALID_ARGUMENT),
        (outside, S.PERMISSION_DENIED),
        (inside, S.OK),
    ]:
        assert submit(s) == code, s


def test_without_job_manager(engine):
    with serving(engine) as srv, client(srv) as c:
        assert code_of(c.jobs.List, finetune_pb2.ListJobsRequest()) == S.UNIMPLEMENTED


def test_serve_command_end_to_end(tiny_llama, tmp_path, capsys):
    """`adapterhub serve` wiring: registry, engine, job manager; a finished job is served."""
    from serving import cli

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        metrics_port = sock.getsockname()[1]
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--model", str(tiny_llama), "--port", "0",
                              "--data-dir", str(tmp_path / "data"), "--pool-mb", "8",
                              "--grace", "5", "--metrics-port", str(metrics_port)])
    assert args.func is cli.run_server
    stop, ready = threading.Event(), []
    thread = threading.Thread(target=cli.run_server, args=(args, stop, ready.append))
    thread.start()
    try:
        end = time.monotonic() + 60
        while not ready and thread.is_alive() and time.monotonic() < end:
            time.sleep(0.05)
        assert ready, "server did not start"
        with client(ready[0]) as c:
            assert c.inference.Generate(request("base")).usage.completion_tokens == 8
            job = c.jobs.Submit(finetune_pb2.SubmitJobRequest(spec=spec("served")))
            states = [j.state for j in c.jobs.Watch(finetune_pb2.WatchJobRequest(id=job.id),
                                                    timeout=120)]
            final = c.jobs.Get(finetune_pb2.GetJobRequest(id=job.id))
            assert states[-1] == OK, final.error
            assert final.adapter_ref == "served/1" and final.mlflow_run_id
            # The adapter was loaded before SUCCEEDED was published: no restart, no wait.
            get = adapters_pb2.GetAdapterRequest(name="served")
            assert c.adapters.Get(get).source == "served/1"
            out = c.inference.Generate(request("tuned", adapter="served"))
            assert out.usage.completion_tokens == 8
            # Registry references resolve on first use too.
            assert c.inference.Generate(request("x", adapter="served/1")).usage.prompt_tokens
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            assert 'adapterhub_finetune_jobs{state="succeeded"} 1.0' in text
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    # One JSON line per request on stderr.
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    served = [x for x in lines if x.get("method") == "InferenceService/Generate"
              and x.get("adapter") == "served"]
    assert served and served[0]["code"] == "OK" and served[0]["tokens"] == 8
    assert served[0]["latency_s"] > 0
