"""Cluster mode on a local Ray (2 CPUs): two engine replicas behind `adapterhub serve --ray`.

The server under test is the CLI's, attached to a Serve application deployed with
build_app (what a RayService does), so the gRPC API, the attach path and the application
are all real. Per-replica counts come from the request ids the API returns
("<replica>/<request>"), residency from AdapterService.List's ``replicas`` field.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf import struct_pb2

from adapterhub.v1 import adapters_pb2, finetune_pb2
from tests.ray_fixtures import ray_session  # noqa: F401 - the shared Ray session fixture
from tests.test_server_support import client, code_of, make_lora, request

S = grpc.StatusCode
APP = "ahtest"
ADAPTERS = ("a", "b", "c", "d")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def loras(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {n: make_lora(tiny_llama, root / n, seed=i) for i, n in enumerate(ADAPTERS)}


@pytest.fixture(scope="module")
def app(ray_session, tiny_llama, tmp_path_factory):  # noqa: F811 - fixture argument
    """The Serve application, deployed as a RayService would: build_app(args)."""
    from ray import serve

    from serving.cluster.app import build_app

    data = tmp_path_factory.mktemp("cluster") / "data"
    ingress_port = _free_port()
    args = dict(base_model=str(tiny_llama), data_dir=str(data), num_replicas=2, num_cpus=0.5,
                max_adapters=8, num_pages=256, block_size=4, max_batched_tokens=64,
                max_queue=64, report_interval_s=0.25, job_poll_s=0.5, grpc_port=ingress_port)
    serve.run(build_app(args), name=APP, route_prefix=None)
    try:
        yield SimpleNamespace(data=data, ingress_port=ingress_port)
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def server(app, tiny_llama):
    """`adapterhub serve --ray auto --ray-app ahtest`, in a thread of this process."""
    from serving import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    metrics_port = _free_port()
    args = parser.parse_args(["serve", "--ray", "auto", "--ray-app", APP, "--port", "0",
                              "--model", str(tiny_llama), "--data-dir", str(app.data),
                              "--grace", "5", "--metrics-port", str(metrics_port)])
    stop, ready = threading.Event(), []
    thread = threading.Thread(target=cli.run_server, args=(args, stop, ready.append))
    thread.start()
    end = time.monotonic() + 120
    while not ready and thread.is_alive() and time.monotonic() < end:
        time.sleep(0.05)
    assert ready, "server did not start"
    srv = ready[0]
    srv.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        yield srv
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def c(server, loras):
    with client(server) as cl:
        for name, path in loras.items():  # admin Load: a path source is fine here
            info = cl.adapters.Load(adapters_pb2.LoadAdapterRequest(name=name, source=str(path)))
            assert info.name == name and info.method == "lora"
        yield cl


def replica_of(request_id: str) -> str:
    return request_id.split("/", 1)[0]


def wait_for(predicate, timeout: float, step: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout}s")


def test_mixed_adapter_traffic_follows_residency(c, server):
    # Mixed traffic (4 adapters and the base model), unary and streaming, from 4 threads.
    counts: dict[str, Counter] = defaultdict(Counter)
    errors: list[grpc.RpcError] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for i in range(12):
            adapter = ("", *ADAPTERS)[(k + i) % 5]
            try:
                if i % 3 == 0:
                    chunks = list(c.inference.GenerateStream(request("mixed", adapter=adapter,
                                                                     max_tokens=6)))
                    rid, tokens = chunks[-1].request_id, sum(len(x.token_ids) for x in chunks)
                else:
                    out = c.inference.Generate(request("mixed", adapter=adapter, max_tokens=6))
                    rid, tokens = out.request_id, out.usage.completion_tokens
                assert tokens == 6
                with lock:
                    counts[adapter][replica_of(rid)] += 1
            except grpc.RpcError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, [e.code() for e in errors]
    assert sum(sum(v.values()) for v in counts.values()) == 48

    # Each adapter's requests land where it is resident: one replica takes (nearly) all.
    listed = wait_for(lambda: {a.name: list(a.replicas) for a in c.adapters.List(
        adapters_pb2.ListAdaptersRequest()).adapters if a.replicas}, 5)
    homes = {}
    for name in ADAPTERS:
        home, n = counts[name].most_common(1)[0]
        assert n >= 0.9 * sum(counts[name].values()), (name, counts[name])
        assert home in listed[name], (name, home, listed)
        homes[name] = home
    assert len(set(homes.values())) == 2, homes  # the adapters are spread over both replicas
    print("per-replica counts:", {k: dict(v) for k, v in counts.items()})

    # Same greedy request, unary vs streamed, possibly on different replicas: same tokens.
    unary = c.inference.Generate(request("same", adapter="b", max_tokens=8))
    chunks = list(c.inference.GenerateStream(request("same", adapter="b", max_tokens=8)))
    assert [t for ch in chunks for t in ch.token_ids] == list(unary.token_ids)
    assert "".join(ch.text for ch in chunks) == unary.text


def test_residency_is_visible_in_list_get_and_metrics(c, server):
    for name in ADAPTERS:
        c.inference.Generate(request("warm", adapter=name, max_tokens=2))
    replicas = server.backend.replicas()
    assert len(replicas) == 2

    def listing():
        got = {a.name: a for a in c.adapters.List(adapters_pb2.ListAdaptersRequest()).adapters}
        return got if all(got[n].replicas for n in ADAPTERS) else None

    got = wait_for(listing, 5)
    for name in ADAPTERS:
        assert got[name].resident and set(got[name].replicas) <= set(replicas)
        one = c.adapters.Get(adapters_pb2.GetAdapterRequest(name=name))
        assert one.source == got[name].source and one.max_rank == 4
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert "adapterhub_replicas 2.0" in text
    for name in ADAPTERS:
        for rid in got[name].replicas:
            assert f'adapterhub_replica_adapter_resident{{adapter="{name}",replica="{rid}"}} 1.0' \
                in text or \
                f'adapterhub_replica_adapter_resident{{replica="{rid}",adapter="{name}"}} 1.0' \
                in text, (name, rid)
    assert 'adapterhub_grpc_requests_total{code="OK",method="InferenceService/Generate"}' in text


def test_in_app_ingress_serves_the_same_api(c, app):
    """The gRPC server inside the application (a RayService's endpoint) over the same
    replicas: the adapters loaded through the CLI's server are served here too."""
    channel = grpc.insecure_channel(f"127.0.0.1:{app.ingress_port}")
    try:
        grpc.channel_ready_future(channel).result(timeout=60)
        from tests.test_server_support import Client

        cl = Client(channel)
        out = cl.inference.Generate(request("via ingress", adapter="a", max_tokens=4))
        direct = c.inference.Generate(request("via ingress", adapter="a", max_tokens=4))
        assert out.token_ids == direct.token_ids
        assert replica_of(out.request_id) == replica_of(direct.request_id)  # affinity
        chunks = list(cl.inference.GenerateStream(request("s", adapter="b", max_tokens=5)))
        assert sum(len(ch.token_ids) for ch in chunks) == 5
        names = {a.name for a in cl.adapters.List(adapters_pb2.ListAdaptersRequest()).adapters}
        assert set(ADAPTERS) <= names
    finally:
        channel.close()


def test_bad_input_gets_precise_statuses(c, tiny_llama):
    gen = c.inference.Generate
    assert code_of(gen, request("x", adapter="nope")) == S.NOT_FOUND
    assert code_of(gen, request("x", adapter="/etc")) == S.INVALID_ARGUMENT  # no path refs
    assert code_of(gen, request("x", adapter="bad name!")) == S.INVALID_ARGUMENT
    assert code_of(gen, request("x", adapter="a", max_tokens=100_000)) == S.INVALID_ARGUMENT
    assert code_of(gen, request("x", temperature=-1.0)) == S.INVALID_ARGUMENT
    assert code_of(gen, request("")) == S.INVALID_ARGUMENT
    assert code_of(gen, request("x", max_tokens=200), timeout=0.05) == S.DEADLINE_EXCEEDED
    load = c.adapters.Load
    assert code_of(load, adapters_pb2.LoadAdapterRequest(name="e", source="")) == \
        S.INVALID_ARGUMENT
    assert code_of(load, adapters_pb2.LoadAdapterRequest(name="e", source=str(tiny_llama))) \
        in (S.NOT_FOUND, S.INVALID_ARGUMENT)  # a model, not an adapter
    assert code_of(c.adapters.Get, adapters_pb2.GetAdapterRequest(name="zz")) == S.NOT_FOUND
    assert code_of(c.adapters.Unload, adapters_pb2.UnloadAdapterRequest(name="zz")) == \
        S.NOT_FOUND
    # The service is unharmed.
    assert c.inference.Generate(request("ok", adapter="a", max_tokens=3)).usage \
        .completion_tokens == 3


def test_cancelled_stream_frees_the_replica(c, server):
    stream = c.inference.GenerateStream(request("long", adapter="c", max_tokens=200))
    first = next(stream)
    stream.cancel()
    rid = replica_of(first.request_id)

    def idle():
        snap = server.backend.view(fresh=True)["replicas"].get(rid)
        return snap is not None and snap["stats"]["running"] == 0 and \
            snap["stats"]["pool"]["kv_pages"] == 0

    wait_for(idle, 10)


def test_unload_and_reload_propagate(c, loras):
    c.inference.Generate(request("x", adapter="d", max_tokens=2))
    c.adapters.Unload(adapters_pb2.UnloadAdapterRequest(name="d"))
    names = {a.name for a in c.adapters.List(adapters_pb2.ListAdaptersRequest()).adapters}
    assert "d" not in names
    assert code_of(c.inference.Generate, request("x", adapter="d")) == S.NOT_FOUND
    # Loaded again under the same name, from another source: every replica serves the new one.
    c.adapters.Load(adapters_pb2.LoadAdapterRequest(name="d", source=str(loras["a"])))
    got = c.adapters.Get(adapters_pb2.GetAdapterRequest(name="d"))
    assert got.source == str(loras["a"])
    same = c.inference.Generate(request("probe", adapter="a", max_tokens=6))
    assert c.inference.Generate(request("probe", adapter="d", max_tokens=6)).token_ids == \
        same.token_ids


def _job_spec(name: str, steps: int) -> finetune_pb2.FineTuneJobSpec:
    params = struct_pb2.Struct()
    params.update({"r": 4, "alpha": 8})
    spec = finetune_pb2.FineTuneJobSpec(
        output_name=name, method="lora", method_params=params,
        training=finetune_pb2.TrainingParams(steps=steps, batch_size=4, max_length=32, lr=1e-2,
                                             checkpoint_every=5))
    for i in range(24):
        spec.dataset.records.records.add(prompt=f"say {i} =", completion=f" {i}{i}")
    return spec


@pytest.mark.slow
def test_killed_replica_loses_no_accepted_work(c, server, app):
    """A replica dies (ray.kill) while it trains a job (co-served in its engine) and serves
    traffic: in-flight requests end OK or UNAVAILABLE, the service answers again within a
    bounded time, the replica is replaced and the job resumes from its checkpoint on
    another replica, in the same MLflow run."""
    import ray
    from mlflow.tracking import MlflowClient

    from adapterhub.settings import default_tracking_uri

    job = c.jobs.Submit(finetune_pb2.SubmitJobRequest(spec=_job_spec("survivor", 60)))

    def progressed():
        got = c.jobs.Get(finetune_pb2.GetJobRequest(id=job.id))
        return got if got.step >= 7 else None

    running = wait_for(progressed, 120, step=0.2)
    owner = wait_for(lambda: next((rid for rid, s in server.backend.view(fresh=True)[
        "replicas"].items() if job.id in s["jobs"]), None), 10)
    actor_name = server.backend.replicas()[owner]["actor_name"]

    outcomes: list[tuple[float, grpc.StatusCode, str]] = []
    stop = threading.Event()

    def traffic(k: int) -> None:
        i = 0
        while not stop.is_set():
            adapter = ("", *ADAPTERS[:3])[(k + i) % 4]
            i += 1
            try:
                if i % 2:
                    out = c.inference.Generate(request("t", adapter=adapter, max_tokens=24),
                                               timeout=60)
                    rid = out.request_id
                else:
                    rid = list(c.inference.GenerateStream(
                        request("t", adapter=adapter, max_tokens=24), timeout=60))[-1].request_id
                outcomes.append((time.monotonic(), S.OK, replica_of(rid)))
            except grpc.RpcError as exc:
                outcomes.append((time.monotonic(), exc.code(), ""))

    threads = [threading.Thread(target=traffic, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)
    orphaned = c.jobs.Get(finetune_pb2.GetJobRequest(id=job.id))
    assert orphaned.state == finetune_pb2.JOB_STATE_RUNNING and orphaned.step < 60
    # Answers again (on the survivor) within a bounded time.
    wait_for(lambda: any(t > killed_at + 0.2 and code is S.OK for t, code, _ in outcomes), 20)
    recovered_s = min(t for t, code, _ in outcomes if t > killed_at + 0.2 and code is S.OK) \
        - killed_at
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(90)
    codes = Counter(code for _, code, _ in outcomes)
    assert set(codes) <= {S.OK, S.UNAVAILABLE}, codes
    assert codes[S.OK] > codes[S.UNAVAILABLE]
    print(f"recovered in {recovered_s:.2f}s; outcomes {dict(codes)}")

    # The accepted job resumes from its last checkpoint elsewhere, in the same MLflow run.
    seen = list(c.jobs.Watch(finetune_pb2.WatchJobRequest(id=job.id), timeout=180))
    final = seen[-1]
    assert final.state == finetune_pb2.JOB_STATE_SUCCEEDED, final.error
    assert final.mlflow_run_id == running.mlflow_run_id and final.adapter_ref == "survivor/1"
    assert final.placement == finetune_pb2.PLACEMENT_CO_SERVE  # trained inside the engines
    killed_step = running.step
    assert min(s.step for s in seen) >= killed_step - killed_step % 5
    out = c.inference.Generate(request("say 3 =", adapter="survivor", max_tokens=4))
    assert out.usage.completion_tokens == 4
    history = MlflowClient(default_tracking_uri(app.data)).get_metric_history(final.mlflow_run_id,
                                                                        "loss")
    assert {m.step for m in history} == set(range(1, 61))  # every step logged, none lost
    tags = MlflowClient(default_tracking_uri(app.data)).get_run(final.mlflow_run_id).data.tags
    assert tags["adapterhub.replica"] != owner  # finished by the replica that adopted it

    # The killed replica is replaced: two live replicas again, the new one serving.
    wait_for(lambda: len(server.backend.view(fresh=True)["replicas"]) == 2 and
             owner not in server.backend.replicas(), 120, step=0.5)


@pytest.mark.slow
def test_serve_ray_deploys_and_removes_its_own_app(ray_session, tiny_llama, tmp_path):  # noqa: F811
    """`adapterhub serve --ray` with no running application deploys one from its flags,
    serves through it and deletes it on exit (attaching is what the other tests use)."""
    from ray import serve

    from serving import cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--ray", "auto", "--ray-app", "ahcli", "--port", "0",
                              "--model", str(tiny_llama), "--data-dir", str(tmp_path / "d"),
                              "--replicas", "1", "--replica-cpus", "0.25", "--pool-mb", "4",
                              "--no-finetune", "--grace", "2"])
    stop, ready = threading.Event(), []
    thread = threading.Thread(target=cli.run_server, args=(args, stop, ready.append))
    thread.start()
    try:
        wait_for(lambda: ready or not thread.is_alive(), 180)
        assert ready, "server did not start"
        assert "ahcli" in serve.status().applications
        with client(ready[0]) as cl:
            out = cl.inference.Generate(request("hi", max_tokens=3))
            assert out.usage.completion_tokens == 3 and "/" in out.request_id
            assert code_of(cl.jobs.List, finetune_pb2.ListJobsRequest()) == S.UNIMPLEMENTED
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive()
    assert "ahcli" not in serve.status().applications


# -- the parts without Ray ---------------------------------------------------------------------
def test_directory_name_table_and_restart():
    from serving.cluster.directory import ReplicaDirectory

    d = ReplicaDirectory(ttl_s=0.2)
    v1 = d.set_name("x", "/a", {"method": "lora"})
    reply = d.report({"replica": "r1", "names_version": 0, "adapters": []})
    assert reply["version"] == v1 and reply["names"]["x"]["source"] == "/a"
    assert "names" not in d.report({"replica": "r1", "names_version": v1, "adapters": []})
    v2 = d.drop_names(["x"])
    assert d.report({"replica": "r1", "names_version": v1})["names"]["x"]["gone"]
    assert "x" not in d.view()["names"] and d.view()["version"] == v2
    time.sleep(0.3)
    assert d.view()["replicas"] == {}  # a replica that stops reporting drops out
    # A restarted directory asks for the table and adopts the replicas' newer copy.
    fresh = ReplicaDirectory()
    table = {"y": {"source": "/b", "info": {}, "version": 7}}
    assert fresh.report({"replica": "r1", "names_version": 7})["send_names"]
    fresh.report({"replica": "r1", "names_version": 7, "names": table})
    assert fresh.view()["names"] == table and fresh.view()["version"] == 7


def test_placement_claims_once_and_adopts_orphans(tmp_path, tiny_llama):
    from adapterhub.finetune import FinetuneJob
    from adapterhub.jobs.errors import StoreInUseError
    from adapterhub.jobs.lock import StoreLock
    from adapterhub.jobs.models import JobState
    from adapterhub.jobs.store import JobStore
    from serving.cluster.placement import Placement

    path = tmp_path / "jobs.db"
    store = JobStore(path)
    first = store.insert(FinetuneJob(name="one", base=str(tiny_llama)))
    same_name = store.insert(FinetuneJob(name="one", base=str(tiny_llama)))
    second = store.insert(FinetuneJob(name="two", base=str(tiny_llama)))
    a, b = Placement(JobStore(path), path), Placement(JobStore(path), path)
    claim_a = a.next_job()
    assert claim_a.job.id == first.id and not claim_a.resume
    # The first is running and locked; the next queued one writes the same name: skipped.
    claim_b = b.next_job()
    assert claim_b.job.id == second.id and b.next_job() is None
    # An embedded JobManager cannot run the store beside the replicas.
    with pytest.raises(StoreInUseError):
        StoreLock(path).acquire()
    # a's replica dies (the kernel drops its locks): b adopts the job and resumes it.
    claim_a.name_lock.release()
    claim_a.lock.release()
    orphan = b.next_job()
    assert orphan.job.id == first.id and orphan.resume
    store.update(first.id, state=JobState.SUCCEEDED)
    orphan.release(final=True)
    assert a.next_job().job.id == same_name.id  # its name is free now
    claim_b.release(final=False)  # stopped, still running: resumable by anyone
    assert b.next_job().job.id == second.id


@pytest.mark.parametrize("args,message", [
    ({"num_replica": 2}, "unknown cluster argument(s) num_replica"),  # misspelt
    ({"num_replicas": 0}, "num_replicas must be at least 1"),
    ({"dtype": "float64"}, "dtype must be one of"),
    ({"coserve": "sometimes"}, "coserve must be overlap, inline or off"),
    ({"num_gpus": -0.5}, "must not be negative"),
])
def test_bad_application_args_are_refused_at_build_time(args, message):
    from serving.cluster.config import ClusterConfig

    with pytest.raises(ValueError) as exc:
        ClusterConfig.from_args(args)
    assert message in str(exc.value)


def test_serve_refuses_bad_cluster_and_coserve_flags(tmp_path, capsys):
    from adapterhub.cli import main

    # Ray Client cannot stream: refused before anything starts, as a user error.
    assert main(["serve", "--data-dir", str(tmp_path), "--ray", "ray://head:10001"]) == 2
    assert "cannot stream" in capsys.readouterr().err
    assert main(["serve", "--data-dir", str(tmp_path), "--port", "0",
                 "--coserve-min-share", "2"]) == 2
    assert "error: min_share must be in [0, 1]" in capsys.readouterr().err
