"""`adapterhub serve` killed while a fine-tune job runs: after a restart the job resumes
from its checkpoint in the same MLflow run and finishes; nothing is lost."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from mlflow.tracking import MlflowClient

from adapterhub.registry import Registry
from adapterhub.v1 import finetune_pb2, finetune_pb2_grpc, inference_pb2, inference_pb2_grpc


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: Path, data: Path, port: int) -> subprocess.Popen:
    exe = Path(sys.executable).parent / "adapterhub"
    log = (data.parent / f"server-{port}.log").open("wb")
    return subprocess.Popen(
        [str(exe), "serve", "--model", str(model), "--data-dir", str(data), "--port", str(port),
         "--pool-mb", "8"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})


def _channel(port: int, proc: subprocess.Popen) -> grpc.Channel:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=90)
    except grpc.FutureTimeoutError:
        raise AssertionError(f"server did not start (exit {proc.poll()})") from None
    return channel


def _spec() -> finetune_pb2.FineTuneJobSpec:
    params = struct_pb2.Struct()
    params.update({"r": 4, "alpha": 8})
    spec = finetune_pb2.FineTuneJobSpec(
        output_name="survivor", method="lora", method_params=params,
        training=finetune_pb2.TrainingParams(steps=40, batch_size=4, max_length=32, lr=1e-2,
                                             checkpoint_every=5))
    for i in range(24):
        spec.dataset.records.records.add(prompt=f"say {i} =", completion=f" {i}{i}")
    return spec


def test_killed_server_resumes_the_running_job(tiny_llama, tmp_path):
    data = tmp_path / "data"
    port = _port()
    proc = _serve(tiny_llama, data, port)
    try:
        jobs = finetune_pb2_grpc.FineTuneServiceStub(_channel(port, proc))
        job = jobs.Submit(finetune_pb2.SubmitJobRequest(spec=_spec()), timeout=60)
        for state in jobs.Watch(finetune_pb2.WatchJobRequest(id=job.id), timeout=120):
            if state.step >= 12:
                break
        os.killpg(proc.pid, signal.SIGKILL)  # no drain, no cleanup: a crash
        proc.wait(30)
        killed_at = state.step
        assert state.state == finetune_pb2.JOB_STATE_RUNNING and state.mlflow_run_id
        run_id = state.mlflow_run_id

        port = _port()
        proc = _serve(tiny_llama, data, port)
        channel = _channel(port, proc)
        jobs = finetune_pb2_grpc.FineTuneServiceStub(channel)
        seen = list(jobs.Watch(finetune_pb2.WatchJobRequest(id=job.id), timeout=180))
        final = seen[-1]
        assert final.state == finetune_pb2.JOB_STATE_SUCCEEDED, final.error
        # Resumed from the last checkpoint (every 5 steps), never from scratch. A step's
        # progress is published before its checkpoint is written, but the next step does not
        # start until it is: seeing step s proves the checkpoint at or below s - 1.
        checkpoint = (killed_at - 1) // 5 * 5
        assert min(s.step for s in seen) >= checkpoint
        assert final.mlflow_run_id == run_id and final.adapter_ref == "survivor/1"
        # The finished adapter is served by the restarted server at once.
        infer = inference_pb2_grpc.InferenceServiceStub(channel)
        out = infer.Generate(inference_pb2.GenerateRequest(prompt="say 3 =", adapter="survivor",
                                                           max_tokens=4), timeout=60)
        assert out.usage.completion_tokens >= 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    registry = Registry(data)
    history = MlflowClient(registry.tracking_uri).get_metric_history(run_id, "loss")
    assert {m.step for m in history} == set(range(1, 41))  # every step's loss recorded once+
    assert [v.version for v in registry.get_adapter("survivor").versions] == [1]
