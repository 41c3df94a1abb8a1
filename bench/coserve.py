"""Co-serving: one fine-tuning job inside the engine while inference arrives (BENCHMARKS.md
section 3, the FlexLLM workload) scaled to CPU.

Prints one JSON object on stdout ({"benchmark": "coserve", "config", "results", "ratios"});
progress goes to stderr. Every side runs in this process, on the same random Llama, the
same fine-tuning job (data, seed, hyper-parameters) and the same request traces:

- ft_trainer: adapterhub's Trainer alone on its own copy of the base (fine-tuning alone),
  half of its time before the co-served sides and half after them.
- coserve_rate0: the job inside the engine with no inference (rate 0).
- inference_<rate>: the engine alone, replaying the trace at that rate, once just before
  and once just after coserve_<rate>, pooled (both halves' p90s are reported).
- coserve_<rate>: the engine with the job attached (overlap: fine-tuning slices beside the
  inference forward, computed in the co-server's worker process on CPU, or on the helper
  thread with --helper thread; the headline) and coserve_inline_<rate> (slices on the
  engine thread after the inference forward), with latency targets of 1.2x what inference
  alone achieved at that rate in its first replay (p90 TPOT and TTFT).
- temporal_<rate>: temporal sharing: one whole inference iteration, then one whole training
  step (an optimizer step), alternating; training steps back to back while no request is in.

Rates: "light" is --light requests per single-request latency (inference alone then keeps
the engine busy about that share of the time), "heavy" is --heavy times the engine's
saturated request throughput (busy all the time); both are measured first, and each
inference-alone side reports its busy share. A rate's trace has at least --min-requests requests
(a p90 over ten requests is nearly their maximum). Requests arrive open-loop from a client
thread (Poisson, S-LoRA's trace generator), as they do from gRPC threads in the server.
Fine-tuning tokens/s count real (unpadded) tokens over each replay's wall time.

    python bench/coserve.py --quick        # ~1 minute on 2 CPU cores
    python bench/coserve.py                # a larger model, longer replays

Every thread uses one intra-op thread (--threads): the engine thread, the worker (or helper
thread) and the Trainer. On this 2-core machine, shared with other work, the overlap mode's
gain is the second core that inference alone leaves idle; ratios are what to read, within
one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/serving.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from percentiles import pct  # noqa: E402
from workload import (  # noqa: E402
    AdapterBank,
    ModelSpec,
    Record,
    Request,
    build_checkpoint,
    make_trace,
)

from adapterhub.checkpoints import load_base  # noqa: E402
from adapterhub.data import Record as DataRecord  # noqa: E402
from adapterhub.methods import create_adapter, make_config  # noqa: E402
from adapterhub.train import TrainConfig, Trainer  # noqa: E402
from serving.engine.config import EngineConfig  # noqa: E402
from serving.engine.coserve import CoserveConfig, CoServer, Trainee, trainable_skeleton  # noqa: E402
from serving.engine.engine import Engine  # noqa: E402
from serving.engine.layout import ModelShape  # noqa: E402
from serving.engine.sampling import SamplingParams  # noqa: E402

FULL = dict(
    model=ModelSpec(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                    intermediate_size=1408, vocab_size=4096),
    duration_s=20.0, saturate_requests=48, min_requests=30, input_range=(16, 64),
    output_range=(16, 48), batch_size=8, max_length=96,
)
QUICK = dict(
    model=ModelSpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=704, vocab_size=2048),
    duration_s=5.0, saturate_requests=32, min_requests=10, input_range=(16, 48),
    output_range=(12, 32), batch_size=8, max_length=64,
)
N_ADAPTERS = 4  # inference requests use a few served LoRA adapters (and the base)


def log(msg: str) -> None:
    print(f"[coserve] {msg}", file=sys.stderr, flush=True)


@dataclass
class Side:
    timings: list[Record] = field(default_factory=list)
    wall_s: float = 0.0
    ft_tokens: int = 0
    step_s: float = 0.0
    extra: dict = field(default_factory=dict)

    def pooled(self, other: Side) -> Side:
        """Both replays' requests and time as one side (percentiles over all requests)."""
        wall, step = self.wall_s + other.wall_s, self.step_s + other.step_s
        extra = {**self.extra, **other.extra}
        if "busy_share" in extra:
            extra["busy_share"] = round(step / wall, 3)
        return Side(self.timings + other.timings, wall, self.ft_tokens + other.ft_tokens,
                    step, extra)

    def summary(self) -> dict:
        done = [t for t in self.timings if t.finish is not None and t.first is not None]
        ttft = [t.first - t.arrival for t in done]
        tpot = [(t.finish - t.first) / (t.output_len - 1) for t in done if t.output_len > 1]
        out = {"wall_s": round(self.wall_s, 3),
               "ft_tokens_per_s": round(self.ft_tokens / self.wall_s, 1) if self.wall_s else 0}
        if self.timings:
            out.update({
                "requests": len(self.timings), "completed": len(done),
                "req_per_s": round(len(done) / self.wall_s, 3),
                "ttft_p50_s": round(pct(ttft, 0.5), 4), "ttft_p90_s": round(pct(ttft, 0.9), 4),
                "tpot_p50_s": round(pct(tpot, 0.5), 5), "tpot_p90_s": round(pct(tpot, 0.9), 5),
                "tpot_mean_s": round(statistics.fmean(tpot), 5) if tpot else None,
            })
        return {**out, **self.extra}


# -- the fine-tuning job -------------------------------------------------------------------
def job_records(n: int, seed: int) -> list[DataRecord]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def word(lo: int, hi: int) -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))

    return [DataRecord(f"{word(2, 6)} {word(4, 12)} {word(3, 10)} =", f" {word(6, 18)}")
            for _ in range(n)]


def seeded_adapter(model, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_adapter(model, make_config("lora", r=8, alpha=16))


# -- replaying a trace -----------------------------------------------------------------------
class Arrivals(threading.Thread):
    """Adds each request to the engine at its arrival time, like a gRPC thread would."""

    def __init__(self, engine: Engine, trace: list[Request], names: list[str | None],
                 t0: float, side: Side) -> None:
        super().__init__(daemon=True)
        self.engine, self.trace, self.names, self.t0, self.side = engine, trace, names, t0, side
        self.ids: dict[str, int] = {}
        self.lock = threading.Lock()
        self.arrived = threading.Event()

    def run(self) -> None:
        for i, r in enumerate(self.trace):
            delay = self.t0 + r.arrival_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
            with self.lock:  # the id must be known before the engine can answer it
                rid = self.engine.add_request(list(r.prompt), params, self.names[i])
                self.ids[rid] = i
            self.arrived.set()


def replay(engine: Engine, trace: list[Request], names: list[str | None],
           trainee: Trainee | None = None, temporal: bool = False,
           duration_s: float | None = None, max_wall_s: float = float("inf")) -> Side:
    """Open-loop replay of ``trace``; with ``temporal`` the job's whole optimizer steps
    alternate with inference iterations (the job is then not attached to the engine).
    Requests still unfinished after ``max_wall_s`` are aborted and count as not completed."""
    side = Side([Record(r.arrival_s, r.output_len) for r in trace])
    t0 = time.monotonic()
    arrivals = Arrivals(engine, trace, names, t0, side)
    arrivals.start()
    tokens0 = trainee.tokens_trained if trainee is not None else 0
    done = 0
    step_s = 0.0
    aborted = False
    while done < len(trace) or (not trace and time.monotonic() - t0 < duration_s):
        if not aborted and time.monotonic() - t0 > max_wall_s and not arrivals.is_alive():
            aborted = True
            with arrivals.lock:
                for rid, i in arrivals.ids.items():
                    if side.timings[i].finish is None:
                        engine.abort(rid)
        busy = engine.has_unfinished()
        if busy:
            t_step = time.monotonic()
            outputs = engine.step()
            now = time.monotonic() - t0
            step_s += now + t0 - t_step
            with arrivals.lock:
                for out in outputs:
                    t = side.timings[arrivals.ids[out.request_id]]
                    if out.new_token_ids and t.first is None:
                        t.first = now
                    if out.finished:
                        t.finish = now if out.finish_reason != "aborted" else None
                        done += 1
        if temporal and trainee is not None:
            whole_training_step(trainee)
        elif not busy:
            arrivals.arrived.wait(0.005)
            arrivals.arrived.clear()
    side.wall_s = time.monotonic() - t0
    if trainee is None:  # how much of the time inference alone kept the engine busy
        side.step_s = step_s
        side.extra["busy_share"] = round(step_s / side.wall_s, 3)
    arrivals.join()
    if trainee is not None:
        side.ft_tokens = trainee.tokens_trained - tokens0
    return side


def wall_cap(trace: list[Request], duration_s: float) -> float:
    """How long a replay may run before its unfinished requests are aborted."""
    last_arrival = trace[-1].arrival_s if trace else 0.0
    return 3 * max(duration_s, last_arrival)


def p90_of(side: Side, kind: str) -> float:
    """A side's p90 first-token latency ("ttft") or time per output token ("tpot")."""
    return side.summary()[f"{kind}_p90_s"]


def whole_training_step(trainee: Trainee) -> None:
    """One optimizer step of the job in one go (every micro-batch whole)."""
    step = trainee.step
    while trainee.step == step:
        k, _ = trainee.select(1 << 30)
        trainee.run(k)


def parallel_capacity(seconds: float = 1.0) -> float:
    """How many cores this process really gets now: the speedup of two threads each doing
    single-threaded GEMMs over one thread (2.0 = a free second core; the machine is shared)."""
    a = torch.randn(192, 192)

    def work(stop: float, counts: list[int], i: int) -> None:
        while time.monotonic() < stop:
            for _ in range(10):
                a @ a
            counts[i] += 10

    rates = []
    for n in (1, 2):
        counts = [0] * n
        stop = time.monotonic() + seconds
        threads = [threading.Thread(target=work, args=(stop, counts, i)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates.append(sum(counts))
    return round(rates[1] / max(rates[0], 1), 2)


# -- main --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads of each thread that computes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--light", type=float, default=0.3,
                        help="light arrival rate: this many requests per single-request "
                        "latency (about the share of time inference alone is busy)")
    parser.add_argument("--heavy", type=float, default=0.6,
                        help="heavy arrival rate as a share of saturated throughput")
    parser.add_argument("--duration", type=float, help="seconds of arrivals per replay")
    parser.add_argument("--min-requests", type=int,
                        help="requests per rate at least (p90s over fewer mean little); "
                        "default 30, 10 with --quick")
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--min-share", type=float, default=0.05)
    parser.add_argument("--helper", choices=["auto", "process", "thread"], default="auto",
                        help="where overlapped slices compute (CoserveConfig.helper)")
    parser.add_argument("--slo-factor", type=float, default=1.2,
                        help="latency targets: this times inference alone's p90 at the rate")
    args = parser.parse_args(argv)
    if args.min_requests is not None and args.min_requests < 1:
        parser.error(f"--min-requests must be at least 1, got {args.min_requests}")
    torch.set_num_threads(max(1, args.threads))
    warnings.filterwarnings("ignore")
    preset = QUICK if args.quick else FULL
    spec: ModelSpec = preset["model"]
    duration = args.duration or preset["duration_s"]
    t_start = time.monotonic()
    load0 = os.getloadavg()[0]
    cores0 = parallel_capacity()
    log(f"parallel capacity {cores0} (two threads over one), load {load0:.1f}")

    tmp = tempfile.TemporaryDirectory(prefix="bench-coserve-")
    ckpt = Path(tmp.name) / "model"
    hf = build_checkpoint(ckpt, spec, args.seed)
    shape = ModelShape.from_hf_config(hf.config.to_dict())
    params = sum(p.numel() for p in hf.parameters())
    del hf
    bank = AdapterBank(N_ADAPTERS, (8,), shape, spec.initializer_range, args.seed + 1)
    train = TrainConfig(steps=100_000, batch_size=preset["batch_size"], lr=1e-3, warmup_steps=0,
                        max_length=preset["max_length"], seed=args.seed, checkpoint_every=0)
    data = job_records(512, args.seed)

    block = 16
    kv_pages = 64 * -(-(preset["input_range"][1] + preset["output_range"][1]) // block)
    engine = Engine(EngineConfig(model=str(ckpt), num_pages=kv_pages * 3, block_size=block,
                                 max_batched_tokens=args.max_batched_tokens, max_num_seqs=64))
    for i in range(N_ADAPTERS):
        engine.register_adapter(bank.name(i), bank.host_adapter(i))

    def trainee() -> Trainee:
        adapter = seeded_adapter(trainable_skeleton(engine.runner.model), args.seed + 7)
        return Trainee("bench-job", adapter, engine.tokenizer, data, train)

    def names_for(trace: list[Request]) -> list[str | None]:
        # Half the requests on the base model, the rest spread over the adapters.
        return [None if r.index % 2 == 0 else bank.name(r.adapter(N_ADAPTERS)) for r in trace]

    def trace_at(rate: float | None, n: int) -> list[Request]:
        return make_trace(n, 1.0, rate, 1.0, preset["input_range"], preset["output_range"],
                          spec.vocab_size, args.seed + 2)

    results: dict[str, dict] = {}

    def record(key: str, side: Side, **extra) -> dict:
        results[key] = {**side.summary(), **extra}
        r = results[key]
        log(f"{key}: ft {r['ft_tokens_per_s']} tok/s, ttft p90 {r.get('ttft_p90_s')}, "
            f"tpot p90 {r.get('tpot_p90_s')} ({time.monotonic() - t_start:.0f}s)")
        return r

    # Warm-up (first-call allocations), then the engine's saturated request throughput.
    warm = trace_at(None, 4)
    replay(engine, warm, names_for(warm))
    sat = trace_at(None, preset["saturate_requests"])
    capacity = record("inference_saturated", replay(engine, sat, names_for(sat)))["req_per_s"]
    # One request at a time: its latency sets what "light" means (busy a share of the time).
    single = []
    for r in sat[:4]:
        t = time.monotonic()
        engine.generate([list(r.prompt)], SamplingParams(max_tokens=r.output_len,
                                                         ignore_eos=True))
        single.append(time.monotonic() - t)
    latency1 = statistics.fmean(single)
    rates = {"light": args.light / latency1, "heavy": args.heavy * capacity}

    # Fine-tuning alone: the Trainer on its own base copy. It is the denominator of every
    # ft_retained ratio, and this machine's speed drifts over a run (it measured 1944-2474
    # tok/s in quick runs of one session), so half its time runs now and half after the
    # co-served sides, pooled.
    base, tok = load_base(ckpt)
    ref = Trainer(seeded_adapter(base, args.seed + 7), tok, data,
                  TrainConfig(**{**train.to_dict(), "steps": 10**9}), progress=False)
    ref.model.train()
    trainer_acc = {"tokens": 0, "wall_s": 0.0, "halves_tokens_per_s": []}

    def trainer_alone(seconds: float) -> None:
        tokens, t = 0, time.monotonic()
        while time.monotonic() - t < seconds:
            batch = ref._batch(0)  # the Trainer's own data order and collation
            out = ref.model(**batch)
            out.loss.backward()
            ref.optimizer.step()
            ref.optimizer.zero_grad(set_to_none=True)
            ref.step += 1
            tokens += int(batch["attention_mask"].sum())
        wall = time.monotonic() - t
        trainer_acc["tokens"] += tokens
        trainer_acc["wall_s"] += wall
        trainer_acc["halves_tokens_per_s"].append(round(tokens / wall, 1))
        results["ft_trainer"] = {
            "wall_s": round(trainer_acc["wall_s"], 3),
            "ft_tokens_per_s": round(trainer_acc["tokens"] / trainer_acc["wall_s"], 1),
            "halves_tokens_per_s": trainer_acc["halves_tokens_per_s"]}
        log(f"ft_trainer: {tokens / wall:.1f} tok/s ({time.monotonic() - t_start:.0f}s)")

    trainer_alone(duration / 2)

    def coserve_side(key: str, trace: list[Request], overlap: bool,
                     slo: tuple[float, float] | None) -> dict:
        config = CoserveConfig(overlap=overlap, helper=args.helper, min_share=args.min_share,
                               ttft_slo_s=slo[0] if slo else None,
                               tpot_slo_s=slo[1] if slo else None)
        engine.coserve = CoServer(engine, config)
        job = trainee()
        engine.coserve.attach(job)
        try:
            side = replay(engine, trace, names_for(trace), job, duration_s=duration,
                          max_wall_s=wall_cap(trace, duration))
        finally:
            engine.coserve.detach(job)
            stats = engine.coserve.stats()
            engine.coserve.close()
            engine.coserve = None
        # How much of the replay the worker process spent computing this job's slices.
        busy = round(job.remote.compute_s / side.wall_s, 3) if job.remote else None
        return record(key, side, slices=job.slices, helper=stats["helper"],
                      worker_busy_share=busy,
                      share_scale_end=stats["share_scale"],
                      slo_misses=stats["slo_misses"], memory_waits=stats["memory_waits"],
                      slo_targets_s=list(slo) if slo else None)

    # Warm-up of co-serving: on CPU its first slices wait for the worker process to start
    # (a server starts it with the engine); nothing here is measured.
    engine.coserve = CoServer(engine, CoserveConfig(overlap=True, helper=args.helper))
    job = trainee()
    engine.coserve.attach(job)
    deadline = time.monotonic() + 120
    while job.slices < 2 and time.monotonic() < deadline:
        engine.step()
    engine.coserve.detach(job)
    engine.coserve.close()
    engine.coserve = None

    coserve_side("coserve_rate0", [], overlap=True, slo=None)
    coserve_side("coserve_inline_rate0", [], overlap=False, slo=None)
    min_requests = args.min_requests or preset["min_requests"]
    for name, rate in rates.items():
        trace = trace_at(rate, max(min_requests, int(rate * duration)))
        max_wall = wall_cap(trace, duration)

        # Inference alone is every latency ratio's denominator: it replays the trace just
        # before and just after the co-served (overlap) side, pooled, so drift over the
        # run does not land on one side of the ratio only.
        first = replay(engine, trace, names_for(trace), max_wall_s=max_wall)
        slo = (args.slo_factor * p90_of(first, "ttft"), args.slo_factor * p90_of(first, "tpot"))
        coserve_side(f"coserve_{name}", trace, overlap=True, slo=slo)
        second = replay(engine, trace, names_for(trace), max_wall_s=max_wall)
        record(f"inference_{name}", first.pooled(second), rate_req_per_s=round(rate, 3),
               halves_p90_ttft_tpot_s=[[round(p90_of(h, k), 4) for k in ("ttft", "tpot")]
                                       for h in (first, second)])
        coserve_side(f"coserve_inline_{name}", trace, overlap=False, slo=slo)
        job = trainee()
        record(f"temporal_{name}", replay(engine, trace, names_for(trace), job, temporal=True,
                                          max_wall_s=max_wall))
    trainer_alone(duration / 2)

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = results[a].get(key), results[b].get(key)
        return round(x / y, 3) if x is not None and y else None

    ft_alone = "ft_trainer"
    ratios = {
        "ft_retained_rate0": ratio("coserve_rate0", ft_alone, "ft_tokens_per_s"),
        "ft_retained_light": ratio("coserve_light", ft_alone, "ft_tokens_per_s"),
        "ft_retained_heavy": ratio("coserve_heavy", ft_alone, "ft_tokens_per_s"),
        "ttft_p90_with_ft": ratio("coserve_heavy", "inference_heavy", "ttft_p90_s"),
        "tpot_p90_with_ft": ratio("coserve_heavy", "inference_heavy", "tpot_p90_s"),
        "ttft_p90_with_ft_light": ratio("coserve_light", "inference_light", "ttft_p90_s"),
        "tpot_p90_with_ft_light": ratio("coserve_light", "inference_light", "tpot_p90_s"),
        "ft_vs_temporal": ratio("coserve_heavy", "temporal_heavy", "ft_tokens_per_s"),
        "tpot_vs_temporal": ratio("coserve_heavy", "temporal_heavy", "tpot_p90_s"),
        "ft_vs_temporal_light": ratio("coserve_light", "temporal_light", "ft_tokens_per_s"),
        "tpot_vs_temporal_light": ratio("coserve_light", "temporal_light", "tpot_p90_s"),
    }
    for name in rates:  # the single-thread (inline) mode, for comparison
        ratios[f"inline_ft_retained_{name}"] = ratio(f"coserve_inline_{name}", ft_alone,
                                                     "ft_tokens_per_s")
        ratios[f"inline_ttft_p90_with_ft_{name}"] = ratio(f"coserve_inline_{name}",
                                                          f"inference_{name}", "ttft_p90_s")
        ratios[f"inline_tpot_p90_with_ft_{name}"] = ratio(f"coserve_inline_{name}",
                                                          f"inference_{name}", "tpot_p90_s")
    report = {
        "benchmark": "coserve",
        "config": {
            "preset": "quick" if args.quick else "full", "model_params": params,
            "model": spec.__dict__, "job": {"method": "lora", "r": 8, **train.to_dict(),
                                            "records": len(data)},
            "duration_s": duration, "max_batched_tokens": args.max_batched_tokens,
            "min_share": args.min_share, "slo_factor": args.slo_factor,
            "helper": args.helper,
            "rates_req_per_s": {k: round(v, 3) for k, v in rates.items()},
            "rate_definitions": {
                "light": f"{args.light} / single-request latency ({latency1:.3f}s)",
                "heavy": f"{args.heavy} x saturated throughput ({capacity} req/s)"},
            "threads_per_computing_thread": args.threads, "cpu_count": os.cpu_count(),
            "loadavg_1m_start_end": [round(load0, 2), round(os.getloadavg()[0], 2)],
            "parallel_capacity_start_end": [cores0, parallel_capacity()],
            "ft_alone": "adapterhub Trainer, own base copy, same job; half its time before "
                        "the co-served sides, half after, pooled",
            "headline": "coserve_* = overlap mode; ttft/tpot ratios at the heavy rate",
        },
        "results": results,
        "ratios": ratios,
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
