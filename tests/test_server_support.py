"""Shared helpers of the gRPC server tests: tiny adapters, engines, servers and clients.

No tests here; the test_server_* modules import these.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch
from transformers import AutoModelForCausalLM

from adapterhub.methods import create_adapter, make_config
from adapterhub.v1 import (
    adapters_pb2_grpc,
    finetune_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)
from serving.api import Server, ServerConfig
from serving.engine.config import EngineConfig
from serving.engine.engine import Engine
from serving.engine.loop import EngineLoop


def make_lora(base: Path, out: Path, r: int = 4, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    adapter = create_adapter(AutoModelForCausalLM.from_pretrained(base), make_config("lora", r=r))
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.normal_(0, 0.3)
    adapter.save(out)
    return out


def make_engine(model: Path, **overrides) -> Engine:
    cfg = dict(model=str(model), num_pages=256, block_size=4, max_batched_tokens=64,
               max_queue=64)
    cfg.update(overrides)
    return Engine(EngineConfig(**cfg))


@contextmanager
def serving(engine: Engine, jobs=None, registry=None, **config) -> Iterator[Server]:
    """A started server on a free loopback port over a fresh loop of ``engine``."""
    # Two loops stepping one engine would steal each other's outputs.
    assert not getattr(engine, "_test_loop_running", False), "engine already has a loop"
    config.setdefault("port", 0)
    config.setdefault("grace_s", 5.0)
    server = Server(EngineLoop(engine, idle_wait_s=0.01), jobs, registry,
                    ServerConfig(**config)).start()
    engine._test_loop_running = True
    try:
        yield server
    finally:
        server.stop()
        engine._test_loop_running = False
        wait_idle(engine)


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    """Wait until the engine holds no requests and no KV pages (drives it if no loop runs)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not engine.has_unfinished() and engine.pool.stats().kv_pages == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.pool.stats()}, live={len(engine._live)}")


class Client:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.inference = inference_pb2_grpc.InferenceServiceStub(channel)
        self.adapters = adapters_pb2_grpc.AdapterServiceStub(channel)
        self.jobs = finetune_pb2_grpc.FineTuneServiceStub(channel)

    def close(self) -> None:
        self.channel.close()


@contextmanager
def client(server: Server, credentials: grpc.ChannelCredentials | None = None,
           target: str | None = None, options=()) -> Iterator[Client]:
    target = target or f"127.0.0.1:{server.port}"
    channel = (grpc.secure_channel(target, credentials, options=options) if credentials
               else grpc.insecure_channel(target, options=options))
    c = Client(channel)
    try:
        yield c
    finally:
        c.close()


def request(prompt: str = "hello", adapter: str = "", max_tokens: int = 8,
            **sampling) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(
        prompt=prompt, adapter=adapter, max_tokens=max_tokens, ignore_eos=True,
        sampling=inference_pb2.SamplingParams(**sampling))


def code_of(fn, *args, **kwargs) -> grpc.StatusCode:
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
