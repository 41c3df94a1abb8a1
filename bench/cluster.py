"""Cluster routing: adapter-affinity vs adapter-blind routing over 2 engine replicas.

Prints one JSON object on stdout ({"benchmark": "cluster", "config", "results", "ratios"});
progress goes to stderr. One run, one local Ray, one Serve application of 2 engine
replicas (serving.cluster.app), 200 LoRA adapters of mixed ranks on disk, and one request
trace whose adapters follow a Zipf popularity. The trace is replayed through the gRPC
server's own backend (ClusterBackend) with each routing:

- affinity: the adapter is the request's multiplexed model id; the adapter-affinity router
  sends it to the replica that holds the adapter (spilling only under imbalance);
- random: the same deployment, no model id: power of two choices, blind to adapters.

Each replay names the adapters afresh (same directories, new names published with the
cluster name table), so every replay starts with nothing loaded; names of the previous
replay are unloaded first, which frees their pool pages. Replays alternate order across
repeats so warm-up effects do not favour one side.

Steady state: the first ``--warmup-share`` of the trace runs with the same routing but is
not measured (every adapter's first load is unavoidable on either side and would dominate
a short run); cold loads and throughput are counted over the rest. Cold loads: adapter
copies into a replica's device pool (the engine's ``adapter_loads``, summed over
replicas): a request whose adapter is not resident where it runs pays one. Host loads
(reading and validating the adapter directory on a replica) are reported too. Each
replica's pool holds ``--pool-adapters`` adapters of the mean rank beside its KV cache: by
default a third of the 200, so the two pools together hold most of the hot set, the
regime a cluster is sized for.

    python bench/cluster.py --quick      # about a minute on 2 CPU cores
    python bench/cluster.py              # more requests, 2 repeats per side
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/serving.py
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from percentiles import pct  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from workload import ModelSpec, build_checkpoint  # noqa: E402

from serving.engine.layout import TARGET_MODULES  # noqa: E402
from serving.engine.sampling import SamplingParams  # noqa: E402

FULL = dict(
    model=ModelSpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=704, vocab_size=2048),
    num_requests=2000, concurrency=16, input_range=(8, 32), output_range=(4, 12), repeats=2,
)
QUICK = dict(
    model=ModelSpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=704, vocab_size=2048),
    num_requests=640, concurrency=16, input_range=(8, 24), output_range=(4, 8), repeats=1,
)
RANKS = (16, 8, 4, 2)
FIRST_PROMPT_ID = 4  # the char tokenizer's specials come first


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


# -- adapters and trace ---------------------------------------------------------------------
def module_dims(spec: ModelSpec) -> dict[str, tuple[str, int, int]]:
    h, i = spec.hidden_size, spec.intermediate_size
    kv = spec.num_kv_heads * (h // spec.num_heads)
    dims = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return {m: ("self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
                else "mlp", *dims[m]) for m in TARGET_MODULES}


def write_adapters(root: Path, spec: ModelSpec, n: int, seed: int) -> list[Path]:
    """n PEFT LoRA directories (every target module, ranks cycled over RANKS)."""
    g = torch.Generator().manual_seed(seed)
    dims = module_dims(spec)
    paths = []
    for k in range(n):
        r = RANKS[k % len(RANKS)]
        path = root / f"a{k}"
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for layer in range(spec.num_layers):
            for m, (block, d_in, d_out) in dims.items():
                key = f"base_model.model.model.layers.{layer}.{block}.{m}"
                # Deltas ~0.3x the base output scale: visible, finite (see workload.py).
                scale = (0.3 * spec.initializer_range / r ** 0.5) ** 0.5
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=g) * scale
                tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * scale
        save_file(tensors, str(path / "adapter_model.safetensors"))
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
            "target_modules": list(TARGET_MODULES), "bias": "none",
            "task_type": "CAUSAL_LM", "base_model_name_or_path": "bench"}))
        paths.append(path)
    return paths


def make_trace(n_requests: int, n_adapters: int, zipf_s: float, input_range: tuple[int, int],
               output_range: tuple[int, int], vocab: int, seed: int) -> list[dict]:
    """Adapter k with probability ~ 1/(k+1)^s, shuffled ranks so hot adapters mix ranks."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_adapters + 1) ** zipf_s
    order = rng.permutation(n_adapters)  # popularity rank -> adapter index
    picks = order[rng.choice(n_adapters, n_requests, p=weights / weights.sum())]
    return [{"adapter": int(a),
             "prompt": [int(t) for t in rng.integers(FIRST_PROMPT_ID, vocab,
                                                     rng.integers(*input_range))],
             "output_len": int(rng.integers(*output_range))} for a in picks]


# -- one replay -----------------------------------------------------------------------------
def counters(backend) -> dict[str, dict[str, int]]:
    view = backend.view(fresh=True)["replicas"]
    return {rid: {"pool_loads": s["stats"]["adapter_loads"], "host_loads": s["host_loads"],
                  "evictions": s["stats"]["adapter_evictions"],
                  "tokens": s["stats"]["tokens_generated"]} for rid, s in view.items()}


def settle(backend, interval_s: float) -> None:
    """Wait until the replicas' reports include everything done so far."""
    time.sleep(3 * interval_s)


def replay(backend, trace: list[dict], names: list[str], concurrency: int) -> dict:
    """Closed loop: ``concurrency`` clients, each sends its next request when one ends."""
    nxt = iter(range(len(trace)))
    lock = threading.Lock()
    latencies: list[float] = []
    where: Counter = Counter()
    errors: list[str] = []

    def client() -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            req = trace[i]
            params = SamplingParams(max_tokens=req["output_len"], ignore_eos=True)
            t = time.monotonic()
            try:
                handle = backend.submit(req["prompt"], params, names[req["adapter"]], None)
                final = handle.result(timeout=300)
                if final.finish_reason != "length":
                    raise RuntimeError(f"finished with {final.finish_reason}: {final.error}")
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(time.monotonic() - t)
                where[(req["adapter"], handle.replica)] += 1

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    tokens = sum(r["output_len"] for r in trace)
    # How concentrated each adapter's requests were: share on its busiest replica.
    per_adapter: dict[int, Counter] = {}
    for (a, rid), n in where.items():
        per_adapter.setdefault(a, Counter())[rid] += n
    home_share = sum(c.most_common(1)[0][1] for c in per_adapter.values()) / len(trace)
    per_replica = Counter()
    for (_, rid), n in where.items():
        per_replica[rid] += n
    return {
        "wall_s": round(wall, 3), "req_per_s": round(len(trace) / wall, 3),
        "output_tok_per_s": round(tokens / wall, 2),
        "latency_mean_s": round(statistics.fmean(latencies), 4),
        "latency_p50_s": round(pct(latencies, 0.5), 4),
        "latency_p90_s": round(pct(latencies, 0.9), 4),
        "requests_on_adapter_home_replica": round(home_share, 4),
        "requests_per_replica": dict(per_replica),
    }


def run_side(backend, routing: str, trace, paths, run: int, concurrency: int,
             interval_s: float, warmup: int) -> dict:
    names = [f"r{run}-{routing}-a{k}" for k in range(len(paths))]
    backend.publish({name: str(p) for name, p in zip(names, paths, strict=True)})
    backend.routing = routing  # the same deployment: only the request's model id changes
    log(f"replay {run}: {routing} ({warmup} warm-up requests, {len(trace) - warmup} measured)")
    replay(backend, trace[:warmup], names, concurrency)
    settle(backend, interval_s)
    before = counters(backend)
    res = replay(backend, trace[warmup:], names, concurrency)
    settle(backend, interval_s)
    after = counters(backend)
    for key in ("pool_loads", "host_loads", "evictions"):
        res[key] = sum(after[r][key] - before.get(r, {}).get(key, 0) for r in after)
    res["distinct_adapters"] = len({t["adapter"] for t in trace[warmup:]})
    backend.unpublish(names)  # frees their pool pages before the next replay
    settle(backend, interval_s)
    return res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-adapters", type=int, default=200)
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of popularity")
    parser.add_argument("--num-requests", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--pool-adapters", type=int, default=64,
                        help="adapters (of the mean rank) one replica's pool holds beside KV")
    parser.add_argument("--warmup-share", type=float, default=0.5,
                        help="leading share of the trace run but not measured")
    parser.add_argument("--imbalance", type=int, default=None,
                        help="affinity router spill threshold (default: the product default)")
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--replica-gpus", type=float, default=0.0)
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("num_requests", "concurrency"):
        if getattr(args, key):
            cfg[key] = getattr(args, key)
    spec: ModelSpec = cfg["model"]
    t_start = time.monotonic()
    # Ray's log monitor prints to stdout; keep stdout for the JSON alone.
    json_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import ray
    from ray import serve

    from serving.cluster.app import DIRECTORY, build_app
    from serving.cluster.backend import ClusterBackend
    from serving.cluster.router import DEFAULT_IMBALANCE

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        root = Path(tmp)
        build_checkpoint(root / "base", spec, seed=args.seed)
        paths = write_adapters(root / "adapters", spec, args.num_adapters, args.seed)
        trace = make_trace(cfg["num_requests"], args.num_adapters, args.zipf,
                           cfg["input_range"], cfg["output_range"], spec.vocab_size, args.seed)
        # Pool: the requested number of mean-rank adapters plus KV for a full batch.
        kv_dim = spec.num_kv_heads * (spec.hidden_size // spec.num_heads)
        block = 16
        page = spec.num_layers * 2 * block * kv_dim
        per_rank = spec.num_layers * sum(d_in + d_out
                                         for _, d_in, d_out in module_dims(spec).values())
        mean_pages = statistics.fmean(-(-per_rank * r // page) for r in RANKS)
        kv_pages = cfg["concurrency"] * -(-(cfg["input_range"][1] + cfg["output_range"][1])
                                          // block)
        num_pages = int(args.pool_adapters * mean_pages + kv_pages + 8)
        interval_s = 0.25
        app_args = dict(base_model=str(root / "base"), data_dir=str(root / "data"),
                        num_replicas=2, num_cpus=args.replica_cpus, num_gpus=args.replica_gpus,
                        device=args.device, max_adapters=args.pool_adapters,
                        num_pages=num_pages, block_size=block, max_batched_tokens=256,
                        max_num_seqs=cfg["concurrency"], finetune=False,
                        report_interval_s=interval_s,
                        affinity_imbalance=args.imbalance or DEFAULT_IMBALANCE)
        ray.init(num_cpus=max(2, int(2 * args.replica_cpus)),
                 num_gpus=2 * args.replica_gpus if args.replica_gpus else None,
                 include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False)
        try:
            serve.start(proxy_location="Disabled")
            t = time.monotonic()
            handle = serve.run(build_app(app_args), name="bench", route_prefix=None)
            deploy_s = time.monotonic() - t
            log(f"2 replicas up in {deploy_s:.1f}s")
            backend = ClusterBackend(handle, serve.get_deployment_handle(DIRECTORY, "bench"))
            # Warm-up outside the clock: base-model requests on both replicas.
            warm = [backend.submit([5, 6, 7, 8], SamplingParams(max_tokens=2, ignore_eos=True),
                                   None, None) for _ in range(8)]
            for h in warm:
                h.result(timeout=120)
            # Both replicas have their registry open (MLflow import) before the clock runs.
            while not all(s.get("registry_ready") for s in backend.replicas().values()):
                time.sleep(0.2)
            warmup = int(args.warmup_share * len(trace))
            order = ["affinity", "random"] if cfg["repeats"] == 1 else \
                ["affinity", "random", "random", "affinity"][: 2 * cfg["repeats"]]
            runs: dict[str, list[dict]] = {"affinity": [], "random": []}
            for k, routing in enumerate(order):
                runs[routing].append(run_side(backend, routing, trace, paths, k,
                                              cfg["concurrency"], interval_s, warmup))
            backend.shutdown()
        finally:
            serve.shutdown()
            ray.shutdown()

    def mean(side: str, key: str) -> float:
        return statistics.fmean(r[key] for r in runs[side])

    cold = {s: mean(s, "pool_loads") for s in runs}
    host = {s: mean(s, "host_loads") for s in runs}
    thr = {s: mean(s, "output_tok_per_s") for s in runs}
    out = {
        "benchmark": "cluster",
        "config": {
            "quick": args.quick, "device": args.device, "replicas": 2,
            "replica_cpus": args.replica_cpus, "replica_gpus": args.replica_gpus,
            "num_adapters": args.num_adapters, "ranks": list(RANKS), "zipf_s": args.zipf,
            "num_requests": cfg["num_requests"], "concurrency": cfg["concurrency"],
            "input_range": list(cfg["input_range"]), "output_range": list(cfg["output_range"]),
            "model": spec.__dict__, "pool_pages": num_pages, "pool_adapters": args.pool_adapters,
            "repeats": cfg["repeats"], "order": order, "seed": args.seed,
            "warmup_share": args.warmup_share,
            "affinity_imbalance": args.imbalance or DEFAULT_IMBALANCE,
        },
        "results": {"deploy_s": round(deploy_s, 2), "affinity": runs["affinity"],
                    "random": runs["random"],
                    "total_s": round(time.monotonic() - t_start, 1)},
        "ratios": {
            "cold_loads_affinity_vs_random": round(cold["affinity"] / max(cold["random"], 1),
                                                   4),
            "throughput_affinity_vs_random": round(thr["affinity"] / thr["random"], 4),
            "host_loads_affinity_vs_random": round(host["affinity"] / max(host["random"], 1),
                                                   4),
            "latency_p90_affinity_vs_random": round(
                mean("affinity", "latency_p90_s") / mean("random", "latency_p90_s"), 4),
        },
    }
    json_out.write(json.dumps(out, indent=1) + "\n")
    json_out.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
