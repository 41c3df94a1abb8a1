"""gRPC inference and adapter RPCs on a real loopback server: results, streaming, deadlines,
cancellation, precise status codes, overload, health, reflection, metrics and drain."""

from __future__ import annotations

import math
import socket
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from adapterhub.v1 import adapters_pb2
from adapterhub.v1.inference_pb2_grpc import InferenceServiceStub
from serving.api import ServerConfig, build_server
from serving.engine.loop import EngineLoop
from tests.test_server_support import (
    client,
    code_of,
    make_engine,
    make_lora,
    request,
    serving,
    wait_idle,
)

S = grpc.StatusCode


@pytest.fixture(scope="module")
def loras(tiny_llama, tiny_qwen2, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {"a": make_lora(tiny_llama, root / "a", seed=1),
            "b": make_lora(tiny_llama, root / "b", r=2, seed=2),
            "qwen": make_lora(tiny_qwen2, root / "qwen", seed=3)}


@pytest.fixture(scope="module")
def engine(tiny_llama, loras):
    eng = make_engine(tiny_llama)
    eng.register_adapter("a", loras["a"])
    eng.register_adapter("b", loras["b"])
    return eng


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine) as srv:
        yield srv


@pytest.fixture
def own_engine(tiny_llama, loras):
    """For tests that run a server of their own: one engine must never have two loops."""
    eng = make_engine(tiny_llama)
    eng.register_adapter("a", loras["a"])
    return eng


@pytest.fixture
def c(server):
    with client(server) as cl:
        yield cl


def test_unary_and_stream_agree(c, engine):
    for adapter in ("", "a"):
        unary = c.inference.Generate(request("stream me", adapter=adapter, max_tokens=12))
        assert unary.finish_reason == 1 and unary.usage.completion_tokens == 12
        assert unary.usage.prompt_tokens > 0 and unary.timings.total_s > 0
        chunks = list(c.inference.GenerateStream(request("stream me", adapter=adapter,
                                                         max_tokens=12)))
        assert "".join(ch.text for ch in chunks) == unary.text
        assert [t for ch in chunks for t in ch.token_ids] == list(unary.token_ids)
        assert chunks[-1].finish_reason == 1 and not any(ch.finish_reason for ch in chunks[:-1])
        assert chunks[-1].usage.completion_tokens == 12
    base = c.inference.Generate(request("stream me", max_tokens=12))
    assert base.token_ids != c.inference.Generate(request("stream me", adapter="a",
                                                          max_tokens=12)).token_ids
    wait_idle(engine)


def test_concurrent_streams_over_mixed_adapters(c, engine):
    jobs = [(f"prompt {i}", ["a", "b", ""][i % 3]) for i in range(9)]
    want = [c.inference.Generate(request(p, adapter=a, max_tokens=10)).text for p, a in jobs]
    got: list[str | None] = [None] * len(jobs)

    def run(i: int) -> None:
        p, a = jobs[i]
        got[i] = "".join(ch.text for ch in c.inference.GenerateStream(
            request(p, adapter=a, max_tokens=10), timeout=60))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == want
    wait_idle(engine)


def test_deadline_exceeded_frees_pages(c, engine):
    long = request("deadline", max_tokens=240)
    assert code_of(c.inference.Generate, long, timeout=0.2) == S.DEADLINE_EXCEEDED
    stream = c.inference.GenerateStream(long, timeout=0.3)
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert err.value.code() == S.DEADLINE_EXCEEDED
    wait_idle(engine)
    assert engine.pool.stats().kv_pages == 0


def test_client_cancel_mid_stream_frees_pages(c, engine):
    stream = c.inference.GenerateStream(request("cancel me", adapter="a", max_tokens=240))
    for n, _chunk in enumerate(stream):
        if n == 3:
            assert engine.pool.stats().kv_pages > 0
            stream.cancel()
            break
    wait_idle(engine)
    # The server keeps serving afterwards.
    assert c.inference.Generate(request("after")).usage.completion_tokens == 8


@pytest.mark.parametrize(("req", "code"), [
    (request(adapter="nope"), S.NOT_FOUND),
    (request(adapter="nope@prod"), S.NOT_FOUND),
    (request(adapter="bad name!"), S.INVALID_ARGUMENT),
    (request(adapter="x/0"), S.INVALID_ARGUMENT),
    (request(adapter="models:/"), S.INVALID_ARGUMENT),
    (request(adapter="/etc"), S.INVALID_ARGUMENT),  # local paths are not for inference keys
    (request(""), S.INVALID_ARGUMENT),
    (request("x" * 300), S.INVALID_ARGUMENT),  # longer than the 256-token context
    (request(max_tokens=2**32 - 1), S.INVALID_ARGUMENT),
    (request(temperature=-1), S.INVALID_ARGUMENT),
    (request(temperature=math.nan), S.INVALID_ARGUMENT),
    (request(temperature=math.inf), S.INVALID_ARGUMENT),
    (request(top_p=1.5), S.INVALID_ARGUMENT),
    (request(top_p=-0.1), S.INVALID_ARGUMENT),
    (request(top_k=-1), S.INVALID_ARGUMENT),
    (request(seed=2**64 - 1, temperature=1.0), S.INVALID_ARGUMENT),
    (request(temperature=0.8, top_k=5, top_p=0.9, seed=7), S.OK),
])
def test_status_codes(c, engine, req, code):
    assert code_of(c.inference.Generate, req, timeout=30) == code
    assert code_of(lambda r: list(c.inference.GenerateStream(r, timeout=30)), req) == code
    wait_idle(engine)


def test_bad_stop_sequences(c):
    for stops in ([""], ["s"] * 17, ["x" * 1000]):
        req = request()
        req.stop.extend(stops)
        assert code_of(c.inference.Generate, req) == S.INVALID_ARGUMENT


def test_adapter_service(c, engine, loras, tmp_path):
    names = {a.name for a in c.adapters.List(adapters_pb2.ListAdaptersRequest()).adapters}
    assert {"a", "b"} <= names
    loaded = c.adapters.Load(adapters_pb2.LoadAdapterRequest(name="c", source=str(loras["a"])))
    assert loaded.name == "c" and loaded.method == "lora" and loaded.max_rank == 4
    assert loaded.host_bytes > 0 and loaded.source == str(loras["a"])
    assert c.adapters.Get(adapters_pb2.GetAdapterRequest(name="c")).name == "c"
    assert c.inference.Generate(request("x", adapter="c")).usage.completion_tokens == 8

    def load(name: str, source: str) -> grpc.StatusCode:
        return code_of(c.adapters.Load, adapters_pb2.LoadAdapterRequest(name=name, source=source))

    assert load("q", str(loras["qwen"])) == S.FAILED_PRECONDITION  # other base model
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((loras["a"] / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    assert load("corrupt", str(corrupt)) == S.INVALID_ARGUMENT
    assert load("gone", str(tmp_path / "missing")) == S.NOT_FOUND
    assert load("bad name!", str(loras["a"])) == S.INVALID_ARGUMENT
    assert load("x", "") == S.INVALID_ARGUMENT
    assert load("", "unregistered") == S.NOT_FOUND  # no registry on this server
    assert not {"q", "corrupt", "gone"} & set(engine.store.names())

    stream = c.inference.GenerateStream(request("long", adapter="c", max_tokens=240))
    next(stream)
    c.adapters.Unload(adapters_pb2.UnloadAdapterRequest(name="c"))
    with pytest.raises(grpc.RpcError) as err:  # its running request fails, the server lives
        list(stream)
    assert err.value.code() == S.ABORTED and "unloaded" in err.value.details()
    assert code_of(c.inference.Generate, request(adapter="c")) == S.NOT_FOUND
    assert code_of(c.adapters.Unload, adapters_pb2.UnloadAdapterRequest(name="c")) == S.NOT_FOUND
    assert code_of(c.adapters.Get, adapters_pb2.GetAdapterRequest(name="c")) == S.NOT_FOUND
    wait_idle(engine)


def test_build_server_bare(own_engine):
    engine = own_engine
    loop = EngineLoop(engine, idle_wait_s=0.01)
    grpc_server = build_server(loop, None, None, ServerConfig(port=0))
    port = grpc_server.add_insecure_port("127.0.0.1:0")  # a second port for this test
    grpc_server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            out = InferenceServiceStub(channel).Generate(request("bare"))
            assert out.usage.completion_tokens == 8
    finally:
        grpc_server.stop(0).wait()
        loop.shutdown()
    wait_idle(engine)


def test_health_and_reflection(server):
    with client(server) as cl:
        stub = health_pb2_grpc.HealthStub(cl.channel)
        for name in ("", "adapterhub.v1.InferenceService", "adapterhub.v1.AdapterService",
                     "adapterhub.v1.FineTuneService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(cl.channel).get_services())
    assert {"adapterhub.v1.InferenceService", "adapterhub.v1.AdapterService",
            "adapterhub.v1.FineTuneService", "grpc.health.v1.Health"} <= services


def test_full_queue_is_resource_exhausted(tiny_llama):
    engine = make_engine(tiny_llama, max_num_seqs=2, max_queue=2)
    with serving(engine) as srv, client(srv) as cl:
        codes: list[grpc.StatusCode] = []
        lock = threading.Lock()

        def run() -> None:
            code = code_of(cl.inference.Generate, request("busy", max_tokens=40), timeout=60)
            with lock:
                codes.append(code)

        threads = [threading.Thread(target=run) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert set(codes) == {S.OK, S.RESOURCE_EXHAUSTED}, codes
        assert codes.count(S.OK) >= 2
        assert cl.inference.Generate(request("after")).usage.completion_tokens == 8
    wait_idle(engine)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_endpoint(own_engine):
    engine = own_engine
    port = _free_port()
    with serving(engine, metrics_port=port) as srv, client(srv) as cl:
        cl.inference.Generate(request("metrics", adapter="a"))
        code_of(cl.inference.Generate, request(""))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    text = text.decode()
    for name in ("adapterhub_adapter_running_requests", "adapterhub_adapter_waiting_requests",
                 'adapterhub_pool_pages{kind="free"}', 'adapterhub_pool_pages{kind="kv"}',
                 'adapterhub_pool_pages{kind="adapter"}', "adapterhub_generated_tokens_total",
                 "adapterhub_generated_tokens_per_second",
                 'adapterhub_grpc_requests_total{code="OK",method="InferenceService/Generate"}',
                 'code="INVALID_ARGUMENT"'):
        assert name in text, name


def test_graceful_drain(own_engine):
    engine = own_engine
    with serving(engine) as srv, client(srv) as cl:
        stream = cl.inference.GenerateStream(request("drain", max_tokens=120), timeout=60)
        first = next(stream)
        stopper = threading.Thread(target=srv.stop, args=(20,))
        stopper.start()
        stub = health_pb2_grpc.HealthStub(cl.channel)
        end = time.monotonic() + 10
        while stub.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING and time.monotonic() < end:
            time.sleep(0.01)
        assert stub.Check(health_pb2.HealthCheckRequest()).status == \
            health_pb2.HealthCheckResponse.NOT_SERVING
        assert code_of(cl.inference.Generate, request("late")) == S.UNAVAILABLE
        rest = list(stream)  # the in-flight stream still completes
        stopper.join(30)
    assert len(first.token_ids) + sum(len(ch.token_ids) for ch in rest) == 120
    assert rest[-1].finish_reason == 1
    wait_idle(engine)
