"""Shared helpers of the co-serving tests: records, seeded adapters, a driven engine."""

from __future__ import annotations

import random
import time

import torch

from adapterhub.data import Record
from adapterhub.methods import create_adapter, make_config
from adapterhub.train import TrainConfig
from serving.engine.coserve import CoserveConfig, CoServer, Trainee, trainable_skeleton
from serving.engine.sampling import SamplingParams

METHOD_PARAMS = {
    "lora": {"r": 4, "alpha": 8},
    "mos": {"r": 4, "pool_vectors_per_layer": 2, "private_rank": 1, "shards_per_vector": 2},
    "hydra": {"r_parallel": 2, "r_sequential": 2},
}


def records(n: int = 24, seed: int = 0) -> list[Record]:
    """Prompts and completions of varied lengths, so slices cut micro-batches unevenly."""
    rng = random.Random(seed)
    letters = "abcdefghij"
    return [Record("q " + "".join(rng.choice(letters) for _ in range(rng.randint(2, 18))) + " =",
                   " " + "".join(rng.choice("xyz") for _ in range(rng.randint(1, 10))))
            for _ in range(n)]


def train_config(**overrides) -> TrainConfig:
    cfg = dict(steps=3, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=1, max_length=40,
               seed=3, checkpoint_every=0)
    cfg.update(overrides)
    return TrainConfig(**cfg)


def seeded_adapter(model, method: str, seed: int = 11, **params):
    """The same initial adapter weights for every model it is injected into."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_adapter(model, make_config(method, **{**METHOD_PARAMS[method], **params}))


def coserve_engine(checkpoint):
    """The co-serving tests' engine: 4096 pages of 4 KiB leave room for KV, adapters and
    slice activations."""
    from tests.test_server_support import make_engine

    return make_engine(checkpoint, num_pages=4096, max_batched_tokens=64, max_queue=256)


def attach_job(engine, method: str = "lora", config: CoserveConfig | None = None,
               train: TrainConfig | None = None, name: str = "job", coserver=None,
               **params) -> tuple[CoServer, Trainee]:
    """A trainee on a skeleton over ``engine``'s weights, attached to its co-server."""
    if coserver is None:
        coserver = CoServer(engine, config or CoserveConfig(overlap=False))
        engine.coserve = coserver
    adapter = seeded_adapter(trainable_skeleton(engine.runner.model), method, **params)
    trainee = Trainee(name, adapter, engine.tokenizer, records(), train or train_config())
    coserver.attach(trainee)
    return coserver, trainee


def run_until_done(engine, trainees: list[Trainee], budgets=(64,), request_every: int = 0,
                   timeout_s: float = 180.0) -> int:
    """Step the engine until every trainee is done, cycling the token budget and adding a
    request every ``request_every`` steps; returns the steps taken. A wall-clock bound, not
    a step count: the first overlapped slice waits for the worker process to start."""
    steps = 0
    deadline = time.monotonic() + timeout_s
    while any(t.state.value == "running" or t.busy for t in trainees):
        engine.scheduler.config.max_batched_tokens = budgets[steps % len(budgets)]
        if request_every and steps % request_every == 0:
            engine.add_request([5, 6, 7, 8, 9], SamplingParams(max_tokens=5, ignore_eos=True))
        engine.step()
        steps += 1
        assert time.monotonic() < deadline, "fine-tuning made no progress"
    while engine.has_unfinished():
        engine.step()
    return steps


def detach_all(engine) -> None:
    if engine.coserve is not None:
        for t in list(engine.coserve.trainees):
            engine.coserve.detach(t)
        engine.coserve.close()
        engine.coserve = None
    engine.scheduler.config.max_batched_tokens = engine.config.max_batched_tokens
