"""The main job on the embedded default, end to end through the public API.

Starts `adapterhub serve` (shipped base model, SQLite-backed MLflow and job store in one
data directory, loopback only), measures the base model on a shipped task over gRPC,
submits a fine-tune job over gRPC and watches it, measures the new adapter (served at
once, no restart), shows the registry entry, and prints where the MLflow UI is.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(address: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with status {proc.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"server at {address} did not become healthy in {timeout:.0f}s")


def _accuracy(client, records, adapter: str) -> tuple[float, list[str]]:
    def one(record):
        return client.generate(record.prompt, adapter=adapter, max_tokens=32, timeout=120).text

    with ThreadPoolExecutor(16) as pool:  # concurrent requests share engine iterations
        outputs = list(pool.map(one, records))
    hits = sum(o.strip() == r.completion.strip() for o, r in zip(outputs, records, strict=True))
    return hits / len(records), outputs


def run_demo(data_dir: str | Path | None, steps: int = 150, name: str = "demo-adapter") -> int:
    from adapterhub import settings
    from adapterhub.client import JOB_STATES, Client
    from adapterhub.data import read_jsonl
    from adapterhub.registry import Registry
    from adapterhub.tasks import DEFAULT_TASK, TASKS, task_path

    root = settings.data_dir(data_dir)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    log_path = root / "logs" / "server.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).parent / "adapterhub"
    cmd = [str(exe), "serve", "--data-dir", str(root), "--port", str(port)]
    _say(f"starting the server: {' '.join(cmd)} (log: {log_path})")
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "ADAPTERHUB_HOME": str(root)})
    try:
        _wait_healthy(address, proc)
        _say(f"server is up on {address}")
        records = read_jsonl(task_path(DEFAULT_TASK, "eval"))[:100]
        with Client(address) as client:
            _say(f"task '{DEFAULT_TASK}': {TASKS[DEFAULT_TASK].description}")
            base_acc, _ = _accuracy(client, records, "")
            _say(f"base model exact match on 100 held-out records: {base_acc:.2f}")

            job = client.submit_job(name, method="lora", method_params={"r": 8, "alpha": 16},
                                    task=DEFAULT_TASK, training={"steps": steps},
                                    aliases=["production"])
            _say(f"submitted fine-tune job {job.id} over gRPC; watching it")
            last = None
            shown = -1
            for last in client.watch_job(job.id):
                if last.step // 25 != shown or JOB_STATES[last.state] != "running":
                    shown = last.step // 25
                    print(f"    {JOB_STATES[last.state]:9} step {last.step}/{last.total_steps}"
                          f"  loss {last.loss:.4f}  {last.tokens_per_s:.0f} tokens/s", flush=True)
            if last is None or JOB_STATES[last.state] != "succeeded":
                _say(f"job ended {JOB_STATES[last.state] if last else '?'}: "
                     f"{last.error if last else ''}")
                return 1
            _say(f"job succeeded: registered {last.adapter_ref} (MLflow run {last.mlflow_run_id})")

            tuned_acc, outputs = _accuracy(client, records, f"{name}@production")
            _say(f"adapter '{name}@production' exact match: {tuned_acc:.2f} (base {base_acc:.2f})")
            for r, out in list(zip(records, outputs, strict=True))[:3]:
                print(f"    {r.prompt!r} -> {out!r} (expected {r.completion!r})")
            served = [a.name for a in client.list_adapters()]
            _say(f"adapters loaded in the server: {', '.join(served)}")

        _say("registry:")
        for a in Registry(root).list_adapters():
            aliases = ", ".join(f"{k}->v{v}" for k, v in sorted(a.aliases.items()))
            print(f"    {a.name}  latest v{a.latest_version}  method {a.method}  aliases {aliases}")
        _say(f"MLflow UI: adapterhub ui --data-dir {root}  (then open http://127.0.0.1:5000)")
        if tuned_acc <= base_acc:
            _say("the adapter did not improve on the base model")
            return 1
        return 0
    finally:
        proc.send_signal(signal.SIGTERM)  # graceful: drains in-flight work
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
