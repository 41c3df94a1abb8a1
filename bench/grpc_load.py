"""gRPC load: N concurrent clients over loopback against an in-process AdapterHub server.

Prints one JSON object on stdout ({"benchmark": "grpc_load", "config", "results", "ratios"});
progress goes to stderr. Each client is a thread with its own channel that sends requests
back to back for --seconds: unary Generate and streamed GenerateStream mixed, over the bare
base model and a few LoRA adapters, greedy and sampled. Afterwards the engine must go idle
with no KV pages still allocated (pool_pages_leaked) and no request may have failed (errors).

    python bench/grpc_load.py --quick               # ~15 s on 2 CPU cores, tiny random Llama
    python bench/grpc_load.py --seconds 60 --clients 32
    python bench/grpc_load.py --model adapterhub/assets/base-model --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grpc  # noqa: E402
import torch  # noqa: E402
from percentiles import pct  # noqa: E402  (bench/ is sys.path[0] when run as a script)

from adapterhub.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402
from serving.api import Server, ServerConfig  # noqa: E402
from serving.engine.config import EngineConfig  # noqa: E402
from serving.engine.engine import Engine  # noqa: E402
from serving.engine.loop import EngineLoop  # noqa: E402


def log(msg: str) -> None:
    print(f"[grpc_load] {msg}", file=sys.stderr, flush=True)


def tiny_checkpoint(path: Path) -> Path:
    """A small random Llama with the char tokenizer (the hub is unreachable here)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from adapterhub.tokenizer import save_char_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tok = save_char_tokenizer(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, initializer_range=0.1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    return path


def make_adapters(model: Path, root: Path, n: int) -> list[Path]:
    from transformers import AutoModelForCausalLM

    from adapterhub.methods import create_adapter, make_config

    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(model)  # fresh: adapters wrap their base
        adapter = create_adapter(base, make_config("lora", r=[4, 8, 16][i % 3]))
        with torch.no_grad():
            for p in adapter.trainable_parameters():
                p.normal_(0, 0.05)
        adapter.save(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return dirs


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.tokens = 0
        self.unary = 0
        self.streamed = 0
        self.errors: dict[str, int] = {}


def client_loop(target: str, adapters: list[str], stats: Stats, stop: threading.Event,
                seed: int, max_tokens: int) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(target) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        while not stop.is_set():
            prompt = "".join(rng.choices(string.ascii_lowercase + " ", k=rng.randint(4, 48)))
            sampling = inference_pb2.SamplingParams()
            if rng.random() < 0.3:
                sampling.temperature, sampling.top_p, sampling.seed = 0.8, 0.95, rng.randrange(99)
            req = inference_pb2.GenerateRequest(
                prompt=prompt, adapter=rng.choice(adapters), sampling=sampling,
                max_tokens=rng.randint(4, max_tokens), ignore_eos=True)
            streaming = rng.random() < 0.5
            start = time.monotonic()
            first = None
            try:
                if streaming:
                    n = 0
                    for chunk in stub.GenerateStream(req, timeout=120):
                        if first is None:
                            first = time.monotonic() - start
                        n += len(chunk.token_ids)
                else:
                    n = stub.Generate(req, timeout=120).usage.completion_tokens
            except grpc.RpcError as exc:
                with stats.lock:
                    stats.errors[exc.code().name] = stats.errors.get(exc.code().name, 0) + 1
                continue
            latency = time.monotonic() - start
            with stats.lock:
                stats.latencies.append(latency)
                stats.tokens += n
                if streaming:
                    stats.streamed += 1
                    stats.ttfts.append(first if first is not None else latency)
                else:
                    stats.unary += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 s, 8 clients")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--model", help="checkpoint directory (default: shipped base, else tiny)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.clients = 12.0, 8
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    tmp = Path(tempfile.mkdtemp(prefix="grpc_load-"))
    from adapterhub.basemodel import default_base_path

    shipped = default_base_path()
    if args.model:
        model, model_name = Path(args.model), args.model
    elif (shipped / "config.json").is_file():
        model, model_name = shipped, "shipped"
    else:
        log("no shipped base model; building a tiny random Llama")
        model, model_name = tiny_checkpoint(tmp / "model"), "tiny-random-llama"
    engine = Engine(EngineConfig(model=str(model), device=args.device, pool_bytes=64 * 2**20,
                                 max_batched_tokens=256))
    names = [""]
    for i, path in enumerate(make_adapters(model, tmp / "adapters", args.adapters)):
        engine.register_adapter(f"a{i}", path)
        names.append(f"a{i}")
    server = Server(EngineLoop(engine), config=ServerConfig(port=0, max_workers=args.clients + 8))
    server.start()
    target = f"127.0.0.1:{server.port}"
    log(f"{args.clients} clients for {args.seconds:.0f}s against {target} ({model_name})")

    stats, stop = Stats(), threading.Event()
    threads = [threading.Thread(target=client_loop,
                                args=(target, names, stats, stop, i, args.max_tokens))
               for i in range(args.clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(args.seconds)
    stop.set()
    for t in threads:
        t.join(180)
    wall = time.monotonic() - t0

    # Every client has its answer; the engine must now go idle with no KV pages held.
    end = time.monotonic() + 30
    while engine.has_unfinished() and time.monotonic() < end:
        time.sleep(0.05)
    time.sleep(0.1)
    leaked = engine.pool.stats().kv_pages
    server.stop(grace=5)
    done = len(stats.latencies)
    result = {
        "benchmark": "grpc_load",
        "config": {"clients": args.clients, "seconds": args.seconds, "model": model_name,
                   "adapters": args.adapters, "max_tokens": args.max_tokens,
                   "device": args.device, "mix": "50% unary / 50% stream, 30% sampled",
                   "torch_threads": torch.get_num_threads()},
        "results": {
            "requests": done,
            "unary": stats.unary,
            "streamed": stats.streamed,
            "requests_per_s": round(done / wall, 2),
            "generated_tokens_per_s": round(stats.tokens / wall, 1),
            "p50_latency_s": round(pct(stats.latencies, 0.5), 4),
            "p99_latency_s": round(pct(stats.latencies, 0.99), 4),
            "stream_p50_first_chunk_s": round(pct(stats.ttfts, 0.5), 4),
            "errors": sum(stats.errors.values()),
            "errors_by_code": stats.errors,
            "pool_pages_leaked": leaked,
            "engine_preemptions": engine.scheduler.preemptions,
        },
        "ratios": {},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
