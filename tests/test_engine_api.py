"""The engine's Python API: sampling, stops, streaming, validation, bad adapters, registry refs."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from adapterhub.errors import AdapterError, IncompatibleAdapterError
from adapterhub.methods import create_adapter, make_config
from serving.engine.config import EngineConfig
from serving.engine.engine import Engine
from serving.engine.errors import AdapterNotFound, InvalidRequest, Overloaded
from serving.engine.loop import EngineLoop
from serving.engine.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_llama) -> Engine:
    return Engine(EngineConfig(model=str(tiny_llama), num_pages=96, block_size=4,
                               max_batched_tokens=32, max_queue=8))


@pytest.fixture(scope="module")
def lora_dir(tiny_llama, tmp_path_factory):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    adapter = create_adapter(base, make_config("lora", r=4))
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("lora") / "a"
    adapter.save(path)
    return path


def test_seeded_sampling_ignores_batch_companions(engine):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    alone = engine.generate(["seeded prompt"], p)[0].token_ids
    crowd = engine.generate(["seeded prompt", "other", "more others here"],
                            [p, SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True),
                             GREEDY])[0].token_ids
    assert alone == crowd
    other_seed = SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True)
    assert engine.generate(["seeded prompt"], other_seed)[0].token_ids != alone


def test_top_k_one_is_greedy(engine):
    greedy = engine.generate(["abc abc"], GREEDY)[0].token_ids
    top1 = SamplingParams(max_tokens=12, temperature=0.7, top_k=1, ignore_eos=True)
    assert engine.generate(["abc abc"], top1)[0].token_ids == greedy


def test_stop_sequence_and_max_tokens(engine):
    full = engine.generate(["stop here"], GREEDY)[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    stop = full.text[5:7]
    cut = engine.generate(["stop here"], SamplingParams(max_tokens=12, stop=[stop],
                                                        ignore_eos=True))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    tok = full.token_ids[3]
    by_id = engine.generate(["stop here"], SamplingParams(max_tokens=12, stop_token_ids=[tok],
                                                          ignore_eos=True))[0]
    assert by_id.finish_reason == "stop"
    assert by_id.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": ""}, "empty"),
        ({"prompt": "x" * 300}, "context length"),
        ({"prompt": [1, 2, 10_000]}, "vocabulary"),
        ({"params": SamplingParams(temperature=-1)}, "temperature"),
        ({"params": SamplingParams(top_p=0)}, "top_p"),
        ({"params": SamplingParams(top_k=-2)}, "top_k"),
        ({"params": SamplingParams(max_tokens=0)}, "max_tokens"),
        ({"params": SamplingParams(stop=[""])}, "stop"),
        ({"deadline_s": -1}, "deadline"),
    ],
)
def test_invalid_requests_are_refused(engine, kwargs, message):
    args = {"prompt": "ok", "params": GREEDY, **kwargs}
    with pytest.raises(InvalidRequest, match=message):
        engine.add_request(args["prompt"], args["params"], deadline_s=args.get("deadline_s"))
    assert not engine.has_unfinished()


def test_unknown_adapter_and_full_queue(engine):
    with pytest.raises(AdapterNotFound, match="nope"):
        engine.add_request("hi", GREEDY, adapter="nope")
    ids = [engine.add_request("hi", GREEDY) for _ in range(engine.config.max_queue)]
    with pytest.raises(Overloaded):
        engine.add_request("hi", GREEDY)
    for rid in ids:
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    assert engine.pool.stats().kv_pages == 0


def test_bad_adapters_fail_alone(engine, lora_dir, tmp_path, tiny_qwen2):
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError):
        engine.register_adapter("corrupt", corrupt)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(AdapterError, match="safetensors"):
        engine.register_adapter("pickled", pickled)

    from safetensors.torch import load_file
    nan = tmp_path / "nan"
    nan.mkdir()
    (nan / "adapter_config.json").write_text((lora_dir / "adapter_config.json").read_text())
    tensors = load_file(str(lora_dir / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    with pytest.raises(AdapterError):
        engine.register_adapter("nan", nan)

    # An adapter trained on another base (qwen2 fixture: other KV width) does not fit.
    torch.manual_seed(0)
    other = create_adapter(AutoModelForCausalLM.from_pretrained(tiny_qwen2),
                           make_config("lora", r=2))
    other.save(tmp_path / "other")
    cfg = json.loads((tmp_path / "other" / "adapter_config.json").read_text())
    assert cfg["adapterhub_method"] == "lora"
    with pytest.raises(IncompatibleAdapterError):
        engine.register_adapter("other", tmp_path / "other")

    assert not {"corrupt", "pickled", "nan", "other"} & set(engine.store.names())
    engine.register_adapter("good", lora_dir)
    out = engine.generate(["still serving"], GREEDY, ["good"])[0]
    assert out.finish_reason == "length"
    base = engine.generate(["still serving"], GREEDY)[0]
    assert out.token_ids != base.token_ids


def test_registry_references_resolve_on_first_use(tiny_llama, lora_dir, tmp_path):
    from adapterhub.registry import Registry

    registry = Registry(tmp_path / "data")
    with registry.start_run("serve-test") as run:
        run.log_adapter(lora_dir)
        run.register_adapter("greeter", aliases=["prod"])
    engine = Engine(EngineConfig(model=str(tiny_llama), num_pages=64, block_size=4),
                    resolver=registry.resolve)
    direct = Engine(EngineConfig(model=str(tiny_llama), num_pages=64, block_size=4))
    direct.register_adapter("x", lora_dir)
    want = direct.generate(["resolve me"], GREEDY, ["x"])[0].token_ids
    assert engine.generate(["resolve me"], GREEDY, ["greeter@prod"])[0].token_ids == want
    assert engine.generate(["resolve me"], GREEDY, ["greeter/1"])[0].token_ids == want
    with pytest.raises(AdapterNotFound, match="missing"):
        engine.add_request("x", GREEDY, adapter="missing@prod")


def test_streaming_sync_and_async(engine, lora_dir):
    engine.register_adapter("stream", lora_dir)
    adapters = [["stream", None][i % 2] for i in range(6)]
    want = engine.generate([f"p{i}" for i in range(6)], GREEDY, adapters)
    loop = EngineLoop(engine)  # from here on only the loop's thread may call step()
    try:
        handle = loop.submit("stream me", GREEDY, adapter="stream")
        chunks = list(handle.stream(timeout=30))
        assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
        assert "".join(c.new_text for c in chunks) == chunks[-1].text
        assert sum(len(c.new_token_ids) for c in chunks) == 12

        async def consume(prompt: str, adapter: str | None) -> str:
            h = loop.submit(prompt, GREEDY, adapter=adapter)
            return "".join([c.new_text async for c in h.astream()])

        async def main():
            return await asyncio.gather(*(consume(f"p{i}", a) for i, a in enumerate(adapters)))

        texts = asyncio.run(main())
        assert texts == [w.text for w in want]
    finally:
        loop.shutdown()


def test_a_stream_whose_event_loop_closed_does_not_stop_the_engine(engine):
    loop = EngineLoop(engine)
    try:
        slow = SamplingParams(max_tokens=40, ignore_eos=True)
        orphan = loop.submit("orphan", slow)

        async def start_then_leave() -> None:
            # Register an asyncio consumer, read one chunk, and let asyncio.run close the loop
            # without closing the generator (as a crashed client thread would).
            agen = orphan.astream()
            await agen.__anext__()

        asyncio.run(start_then_leave())
        out = loop.submit("still served", GREEDY).result(timeout=60)
        assert out.finished and len(out.token_ids) == 12
        assert loop.error is None
    finally:
        loop.shutdown()
