"""Property-based fuzzing of GenerateRequest: every request gets a deliberate status code
(never UNKNOWN or INTERNAL), no pages leak, and the server stays up."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterhub.v1 import inference_pb2
from tests.test_server_support import client, code_of, make_engine, make_lora, serving, wait_idle

S = grpc.StatusCode
ALLOWED = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED}

adapters = st.one_of(
    st.sampled_from(["", "a"]),
    st.sampled_from(["", "a"]),
    st.sampled_from(["", "a", "nope", "a@prod", "a/1", "a/0", "models:/a/2", "models:/",
                     "/etc", "../a", "~", ".", "a b", "@", "a@", "/", "a/latest", "\x00"]),
    st.text(max_size=40),
)


def mostly(valid: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    # Three in four values are plausible so that many requests get past validation.
    return st.one_of(valid, valid, valid, wild)


wild_floats = st.floats(width=32)  # nan, +-inf, huge and negative values
requests = st.builds(
    inference_pb2.GenerateRequest,
    prompt=mostly(st.text(min_size=1, max_size=200),
                  st.one_of(st.text(max_size=400), st.sampled_from(["", " ", "\n" * 5]))),
    adapter=adapters,
    max_tokens=mostly(st.integers(0, 12), st.integers(0, 2**32 - 1)),
    stop=mostly(st.lists(st.text(min_size=1, max_size=6), max_size=3),
                st.lists(st.text(), max_size=18)),
    ignore_eos=st.booleans(),
    sampling=st.builds(
        inference_pb2.SamplingParams,
        temperature=mostly(st.floats(0, 2, width=32), wild_floats),
        top_k=mostly(st.integers(0, 50), st.integers(-(2**31), 2**31 - 1)),
        top_p=mostly(st.floats(0, 1, width=32), wild_floats),
        seed=st.one_of(st.none(), st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1)),
    ),
)


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama, tmp_path_factory):
    engine = make_engine(tiny_llama)
    engine.register_adapter("a", make_lora(tiny_llama, tmp_path_factory.mktemp("fz") / "a"))
    with serving(engine) as srv, client(srv) as c:
        yield engine, c


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=requests, streaming=st.booleans())
def test_fuzz_generate_request(fuzz_server, req, streaming):
    engine, c = fuzz_server
    if streaming:
        code = code_of(lambda: list(c.inference.GenerateStream(req, timeout=30)))
    else:
        code = code_of(c.inference.Generate, req, timeout=30)
    assert code in ALLOWED, (code, req)


def test_server_survives_fuzzing(fuzz_server):
    engine, c = fuzz_server
    wait_idle(engine)
    health = health_pb2_grpc.HealthStub(c.channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    ok = c.inference.Generate(inference_pb2.GenerateRequest(prompt="still up", max_tokens=4))
    assert ok.usage.completion_tokens >= 1
