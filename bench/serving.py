"""Multi-adapter serving, the S-LoRA workload scaled to CPU (BENCHMARKS.md section 1).

Prints one JSON object on stdout ({"benchmark": "serving", "config", "results", "ratios"});
progress goes to stderr. Every side runs in this process on the same random Llama, the same
adapter weights and the same requests (prompts, output lengths, arrival times):

- engine_n1 / engine_n100 / engine_n1000: our engine with 1, 100 and 1000 adapters registered
  (the same requests; a request's adapter is floor(u * n) for its power-law draw u, and at
  n = 1 every request uses adapter a1, rank 32, the nearest to the mix's mean rank of 30).
- peft_swap: HF PEFT with the 100 adapters; batches of one adapter's requests, set_adapter
  between batches (S-LoRA's PEFT baseline).
- peft_mixed: HF PEFT generate(adapter_names=...) on padded batches of mixed adapters in
  arrival order.

Two settings replay one request set. "saturated": every request arrives at t = 0, so each
side runs at its maximum throughput; the headline throughput ratios use it. "moderate":
Gamma (cv = 1, i.e. Poisson) arrivals at --rate (default: half the saturated throughput of
engine_n100), for first-token latency and SLO attainment. Both are open-loop replays: a side
sees a request only once its arrival time has passed.

results also holds "physical_limits" (how much of each side's forward the machine's peak GEMM
rate and read bandwidth explain) and "ceilings" (the most each headline ratio could be on this
machine, from each side's own FLOPs and adapter bytes: a target above its ceiling needs more
than a faster kernel).

The engine's LoRA worker thread (``--lora-worker``, auto by default) computes the deltas on the
second core while the engine's thread runs the base GEMMs; full mode then also runs n = 1 and
n = 1000 without it (``n1000_vs_n1_no_worker``), so both are in the same run.

Every side (model, adapters, KV cache, PEFT) runs in bfloat16 by default: the dtype models and
adapters are served in (S-LoRA measured in fp16). On this CPU (AVX512-BF16) the base GEMMs run
twice as fast as in float32 and the engine's kernels read half the bytes, while HF's per-op
overheads stay. Greedy outputs then differ from unpadded PEFT wherever bf16 rounding flips a
pick, so correctness also gives how often each side's greedy outputs match a float32 run of the
same weights (``float32_reference_match_share``): the accuracy measure. ``--dtype float32``
runs everything in float32, where the engine's greedy outputs equal unpadded PEFT's
(``outputs_match_peft``; the tests check logits within 1e-4).

    python bench/serving.py --quick                 # under a minute on 2 CPU cores
    python bench/serving.py                         # ~30M-parameter model, ranks {64,32,16,8}
    python bench/serving.py --dtype float32
    python bench/serving.py --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Idle OpenMP workers sleep instead of spinning. With another process on one of 2 cores, a
# spinning worker starves the thread doing the work: measured 10-12x slower steps with 2 threads
# (ACTIVE) than with PASSIVE or 1 thread; uncontended, the two policies are within noise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from percentiles import pct  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402
from workload import (  # noqa: E402
    AdapterBank,
    ModelSpec,
    Record,
    Request,
    add_peft_adapters,
    build_checkpoint,
    make_trace,
)

from serving.engine.config import EngineConfig  # noqa: E402
from serving.engine.engine import Engine  # noqa: E402
from serving.engine.layout import ModelShape  # noqa: E402
from serving.engine.sampling import SamplingParams  # noqa: E402

FULL = dict(
    model=ModelSpec(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4,
                    intermediate_size=1408, vocab_size=4096),
    ranks=(64, 32, 16, 8), num_requests=96, input_range=(8, 64), output_range=(8, 32),
    alphas=(0.1, 0.3, 1.0), repeats=1,
)
QUICK = dict(
    model=ModelSpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2,
                    intermediate_size=704, vocab_size=2048),
    ranks=(16, 8, 4, 2), num_requests=64, input_range=(8, 32), output_range=(4, 16),
    alphas=(1.0,), repeats=5,
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
LORA_WORKER = {"auto": None, "on": True, "off": False}  # EngineConfig.lora_worker
N_PEFT = 100  # adapters in the PEFT model (S-LoRA's HF PEFT figure is at 100)
N1_ADAPTER = 1  # the adapter every request uses in engine_n1 (rank ranks[1])
CHECK_REQUESTS = 8  # requests checked against unpadded PEFT, one by one


def log(msg: str) -> None:
    print(f"[serving] {msg}", file=sys.stderr, flush=True)


# -- metrics of a side's per-request records (workload.Record) -----------------------------------
def summarize(records: list[Record], wall_s: float, slo_s: float | None) -> dict:
    done = [r for r in records if r.finish is not None]
    ttft = [r.first - r.arrival for r in done]
    tpot = [(r.finish - r.first) / (r.output_len - 1) for r in done if r.output_len > 1]
    makespan = max(r.finish for r in done) if done else wall_s
    out_tokens = sum(r.output_len for r in done)
    res = {
        "requests": len(records), "completed": len(done),
        "makespan_s": round(makespan, 4),
        "req_per_s": round(len(done) / makespan, 3),
        "output_tok_per_s": round(out_tokens / makespan, 2),
        "ttft_mean_s": round(statistics.fmean(ttft), 4),
        "ttft_p50_s": round(pct(ttft, 0.5), 4),
        "ttft_p90_s": round(pct(ttft, 0.9), 4),
        "ttft_p99_s": round(pct(ttft, 0.99), 4),
        "tpot_mean_s": round(statistics.fmean(tpot), 5) if tpot else None,
        "latency_mean_s": round(statistics.fmean(r.finish - r.arrival for r in done), 4),
    }
    if slo_s is not None:
        res["slo_attainment"] = round(sum(t <= slo_s for t in ttft) / len(records), 4)
    return res


def wait_until(t0: float, t: float) -> None:
    delay = t0 + t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


# -- the engine side ------------------------------------------------------------------------
def instrument(engine: Engine) -> dict[str, float]:
    """Accumulate wall time of the step's parts by wrapping instance methods (no engine edit).

    schedule includes adapter loads into the pool (admission and prefetch); execute includes
    the step's LoRA setup (per-token addresses of adapter rows in the pool; on the slot path,
    copying adapters that join the batch into the slot buffers) and the model forward; the
    rest of step() is draining the inbox and per-token bookkeeping.
    """
    acc: dict[str, float] = defaultdict(float)

    def wrap(obj: object, attr: str, key: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                acc[key] += time.perf_counter() - t
        setattr(obj, attr, timed)

    wrap(engine, "step", "step")
    wrap(engine.scheduler, "schedule", "schedule")
    wrap(engine.cache, "load", "adapter_load")
    wrap(engine.runner, "execute", "execute")
    wrap(engine.runner, "_pool_lora", "lora_setup")
    wrap(engine.runner, "_slot_lora", "lora_setup")
    wrap(engine.runner.model, "forward", "forward")
    wrap(engine.runner.model, "compute_logits", "logits")

    # Counters, outside the timed wrappers. Adapter bytes per step: a decode step must read
    # the base weights once plus every distinct active adapter's weights once, which bounds
    # n-adapter throughput against n = 1 when decode is memory-bound.
    runner, execute = engine.runner, engine.runner.execute

    def counted_execute(batch, *args, **kwargs):
        names = {s.adapter for s, _ in batch.prefills} | {s.adapter for s in batch.decodes}
        names.discard(None)
        acc["tokens"] += sum(n for _, n in batch.prefills) + len(batch.decodes)
        acc["forwards"] += 1
        acc["active_adapters"] += len(names)
        acc["active_adapter_bytes"] += sum(engine.store.get(n).nbytes for n in names)
        return execute(batch, *args, **kwargs)

    runner.execute = counted_execute
    return acc


def base_bytes(engine: Engine) -> int:
    return sum(p.numel() * p.element_size() for p in engine.runner.model.parameters())


def projection_params(engine: Engine) -> int:
    """Weights of the per-token projections (q..down, every layer): what a token's forward
    multiplies, 2 FLOPs each; the embedding is a lookup and the LM head runs on sampled rows."""
    return sum(i * o for i, o in engine.shape.module_dims().values()) * engine.shape.num_layers


def make_engine(ckpt: Path, bank: AdapterBank, n: int, args, num_pages: int,
                lora_worker: bool | None) -> Engine:
    engine = Engine(EngineConfig(model=str(ckpt), device=args.device, dtype=bank.dtype,
                                 num_pages=num_pages, block_size=16,
                                 max_batched_tokens=args.max_batched_tokens,
                                 max_num_seqs=args.max_batch,
                                 lora_worker=lora_worker))
    for i in ([N1_ADAPTER] if n == 1 else range(n)):
        engine.register_adapter(bank.name(i), bank.host_adapter(i))
    return engine


def adapter_index(req: Request, n: int) -> int:
    return N1_ADAPTER if n == 1 else req.adapter(n)


def run_engine(engine: Engine, trace: list[Request], n: int, slo_s: float | None) -> tuple:
    """Open-loop replay on this thread: add what has arrived, step, repeat."""
    # Warm-up outside the clock (first-call allocations), then reset what we count.
    names = [f"a{adapter_index(r, n)}" for r in trace]
    engine.generate([[5, 6, 7, 8]] * 2, SamplingParams(max_tokens=2, ignore_eos=True),
                    adapters=names[:2])
    engine.release_idle_adapters()
    acc = instrument(engine)
    steps0 = engine.steps
    copies0 = engine.runner.adapter_copies
    loads0, evictions0 = engine.cache.loads, engine.cache.evictions
    records = [Record(r.arrival_s, r.output_len) for r in trace]
    by_id: dict[str, int] = {}
    peak_kv = peak_adapter = peak_resident = 0
    batch_tokens = []
    nxt = done = 0
    t0 = time.monotonic()
    while done < len(trace):
        now = time.monotonic() - t0
        while nxt < len(trace) and trace[nxt].arrival_s <= now:
            r = trace[nxt]
            params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
            by_id[engine.add_request(list(r.prompt), params, names[nxt])] = nxt
            nxt += 1
        if not engine.has_unfinished():
            wait_until(t0, trace[nxt].arrival_s)
            continue
        tokens_before = engine.tokens_generated
        outputs = engine.step()
        now = time.monotonic() - t0
        batch_tokens.append(engine.tokens_generated - tokens_before)
        for out in outputs:
            rec = records[by_id[out.request_id]]
            if out.new_token_ids and rec.first is None:
                rec.first = now
            if out.finished:
                if out.finish_reason != "length":
                    raise RuntimeError(f"request ended with {out.finish_reason}: {out.error}")
                rec.finish, rec.tokens = now, list(out.token_ids)
                done += 1
        pool = engine.pool.stats()
        peak_kv = max(peak_kv, pool.kv_pages)
        peak_adapter = max(peak_adapter, pool.adapter_pages)
        peak_resident = max(peak_resident, len(engine.cache.resident_names()))
    wall = time.monotonic() - t0
    res = summarize(records, wall, slo_s)
    steps = engine.steps - steps0
    page_mib = pool.page_bytes / 2**20
    step_s = acc["step"]
    proj = projection_params(engine)
    weight_bytes = acc["forwards"] * proj * engine.config.dtype.itemsize \
        + acc["active_adapter_bytes"]
    flops = 2 * proj * acc["tokens"]
    breakdown = {
        "schedule_excl_adapter_load": acc["schedule"] - acc["adapter_load"],
        "adapter_load": acc["adapter_load"],
        "lora_setup": acc["lora_setup"],
        "forward": acc["forward"],
        "logits": acc["logits"],
        "execute_other": acc["execute"] - acc["lora_setup"] - acc["forward"] - acc["logits"],
        "step_other": step_s - acc["schedule"] - acc["execute"],
    }
    res.update({
        "steps": steps,
        "decode_tokens_per_step_mean": round(statistics.fmean(batch_tokens), 2),
        "step_ms_mean": round(step_s / max(steps, 1) * 1e3, 3),
        "idle_share": round(1 - step_s / wall, 4),
        "step_time_share": {k: round(v / step_s, 4) for k, v in breakdown.items()},
        "lora_path": engine.runner.lora_path,
        "adapter_copies": engine.runner.adapter_copies - copies0,
        "slot_buffer_mib": round(engine.runner.slots.nbytes / 2**20, 2),
        "active_adapters_per_step_mean": round(acc["active_adapters"] / max(steps, 1), 2),
        "active_adapter_mib_per_step_mean": round(
            acc["active_adapter_bytes"] / max(steps, 1) / 2**20, 2),
        "active_adapter_bytes_over_base": round(
            acc["active_adapter_bytes"] / max(steps, 1) / base_bytes(engine), 3),
        "tokens_computed": int(acc["tokens"]),
        # Inputs of physical_limits (main): what the forwards had to multiply and read.
        "forward_s": round(acc["forward"], 4),
        "projection_gflop": round(flops / 1e9, 3),
        "weight_and_adapter_gb_read": round(weight_bytes / 1e9, 3),
        "adapter_gb_read": round(acc["active_adapter_bytes"] / 1e9, 3),
        "adapter_loads": engine.cache.loads - loads0,
        "adapter_evictions": engine.cache.evictions - evictions0,
        "preemptions": engine.scheduler.preemptions,
        "peak_kv_mib": round(peak_kv * page_mib, 2),
        "peak_adapter_mib": round(peak_adapter * page_mib, 2),
        "peak_resident_adapters": peak_resident,
        "pool_mib": round(pool.total_pages * page_mib, 2),
        "adapters_registered": len(engine.store),
        # Token chunks of LoRA deltas the worker thread and the engine's thread computed (None:
        # no worker, the engine's thread ran the kernel after each base GEMM).
        "lora_worker": engine.runner.worker.stats() if engine.runner.worker else None,
    })
    engine.runner.close()
    return res, records


# -- the PEFT sides -------------------------------------------------------------------------
class StepClock(StoppingCriteria):
    """Time of every generated token (generate calls this once per step, never stops)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.times.append(time.monotonic())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def peft_generate(model, reqs: list[Request], adapters: list[str] | None, device: str,
                  clock: StepClock) -> list[list[int]]:
    """Greedy on one left-padded batch; every request gets max_new_tokens of the batch."""
    width = max(len(r.prompt) for r in reqs)
    ids = torch.zeros(len(reqs), width, dtype=torch.long)
    mask = torch.zeros(len(reqs), width, dtype=torch.long)
    for row, r in enumerate(reqs):
        ids[row, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[row, width - len(r.prompt):] = 1
    extra = {"adapter_names": adapters} if adapters is not None else {}
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max(r.output_len for r in reqs), do_sample=False,
                             stopping_criteria=StoppingCriteriaList([clock]), **extra)
    return [out[row, width:width + r.output_len].tolist() for row, r in enumerate(reqs)]


def run_peft(model, trace: list[Request], mode: str, args, slo_s: float | None) -> tuple:
    """Open-loop replay. swap: take the oldest arrived request's adapter and batch up to
    max_batch arrived requests of that adapter; mixed: the max_batch oldest arrived requests.

    A request's first token time is the batch's first decode step and its finish the step
    that produced its last wanted token (as if streamed): PEFT gets no blame for the padding
    steps after it, only for blocking the next batch.
    """
    names = [f"a{r.adapter(N_PEFT)}" for r in trace]
    records = [Record(r.arrival_s, r.output_len) for r in trace]
    waiting: list[int] = []
    nxt = batches = swaps = computed = 0
    current = None
    model.set_adapter("a0")
    peft_generate(model, trace[:2], names[:2] if mode == "mixed" else None, args.device,
                  StepClock())  # warm-up
    t0 = time.monotonic()
    while nxt < len(trace) or waiting:
        now = time.monotonic() - t0
        while nxt < len(trace) and trace[nxt].arrival_s <= now:
            waiting.append(nxt)
            nxt += 1
        if not waiting:
            wait_until(t0, trace[nxt].arrival_s)
            continue
        if mode == "swap":
            name = names[waiting[0]]
            batch = [i for i in waiting if names[i] == name][:args.max_batch]
            if name != current:
                model.set_adapter(name)
                current, swaps = name, swaps + 1
            adapters = None
        else:
            batch = waiting[:args.max_batch]
            adapters = [names[i] for i in batch]
        chosen = set(batch)
        waiting = [i for i in waiting if i not in chosen]
        clock = StepClock()
        reqs = [trace[i] for i in batch]
        outs = peft_generate(model, reqs, adapters, args.device, clock)
        batches += 1
        # Token positions the padded batch computes: every row to the widest prompt, then
        # every row for the longest output (the engine computes only the useful ones).
        width = max(len(r.prompt) for r in reqs)
        computed += len(reqs) * (width + max(r.output_len for r in reqs))
        for i, toks in zip(batch, outs, strict=True):
            rec = records[i]
            rec.first = clock.times[0] - t0
            rec.finish = clock.times[rec.output_len - 1] - t0
            rec.tokens = toks
    wall = time.monotonic() - t0
    res = summarize(records, wall, slo_s)
    useful = sum(len(r.prompt) + r.output_len for r in trace)
    res.update({"batches": batches, "mean_batch": round(len(trace) / batches, 2),
                "computed_over_useful_tokens": round(computed / useful, 3)})
    if mode == "swap":
        res["adapter_swaps"] = swaps
    return res, records


def timed(fn, device: str) -> float:
    """Seconds of one call of ``fn``, its device work included."""
    t = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def batching_gain(model, device: str, batch: int = 32, repeats: int = 10) -> dict:
    """How much faster per token the base model runs 32 one-token rows than one: the most
    any batching can gain over serving requests one at a time (no KV cache, so this is the
    weight GEMMs, which dominate a decode step). On a CPU this is small, because one core's
    FLOP rate is low next to its memory bandwidth; on a GPU it is large. Best of interleaved
    repeats, since this estimates what the machine can do, not what one run got."""
    model = model.to(device).eval()
    best = {1: float("inf"), batch: float("inf")}
    inputs = {b: torch.randint(4, model.config.vocab_size, (b, 1), device=device) for b in best}
    with torch.inference_mode():
        for _ in range(repeats):
            for b, ids in inputs.items():
                best[b] = min(best[b], timed(lambda ids=ids: model(ids), device))
    t1, tb = best[1], best[batch]
    return {"forward_b1_ms": round(t1 * 1e3, 3), f"forward_b{batch}_ms": round(tb * 1e3, 3),
            f"batching_gain_b{batch}": round(batch * t1 / tb, 2)}


def machine_limits(hidden: int, intermediate: int, device: str, dtype: torch.dtype,
                   repeats: int = 10) -> dict:
    """What this machine can do, measured here (BENCHMARKS.md "Physical limits"): peak GEMM
    rate in the run's dtype on the model's gate/up projection shape at 256 rows with the weight
    in cache, and read bandwidth over a buffer far larger than the last-level cache. Best of
    repeats."""
    x = torch.randn(256, hidden, device=device, dtype=dtype)
    w = torch.randn(intermediate, hidden, device=device, dtype=dtype)
    buf = torch.ones(32 * 2**20, device=device)  # 128 MiB: 4x this machine's last-level cache
    with torch.inference_mode():
        best_mm = min(timed(lambda: torch.nn.functional.linear(x, w), device)
                      for _ in range(repeats))
        best_read = min(timed(buf.sum, device) for _ in range(max(3, repeats // 3)))
    return {"peak_gemm_gflop_per_s": round(2 * x.numel() * intermediate / best_mm / 1e9, 1),
            "read_gb_per_s": round(buf.numel() * 4 / best_read / 1e9, 1)}


def physical_limits(side: dict, machine: dict) -> dict:
    """How much of a side's forward time the machine's limits explain: its projection FLOPs at
    peak GEMM rate, its weight and adapter bytes at full read bandwidth, and both one after the
    other (one thread cannot overlap them). A serial share near 1 leaves little to gain. Where
    the weights fit the last-level cache (the --quick model), they are read from cache, not at
    the measured memory bandwidth, so the read share overstates what reading costs there."""
    fwd = side["forward_s"]
    compute = side["projection_gflop"] / machine["peak_gemm_gflop_per_s"]
    read = side["weight_and_adapter_gb_read"] / machine["read_gb_per_s"]
    return {"achieved_gflop_per_s": round(side["projection_gflop"] / fwd, 1),
            "gemm_share_of_peak": round(compute / fwd, 3),
            "read_gb_per_s": round(side["weight_and_adapter_gb_read"] / fwd, 1),
            "read_share_of_bandwidth": round(read / fwd, 3),
            "compute_plus_read_share_of_forward": round((compute + read) / fwd, 3)}


def ceilings(results: dict, machine: dict) -> dict:
    """The most the headline ratios could be on this machine, from each side's own work.

    An engine side cannot finish before its projection FLOPs at peak GEMM rate and its adapter
    rows at full read bandwidth: one after the other where one thread does both (nothing
    overlaps oneDNN's GEMMs with the LoRA kernel's reads), the longer of the two where the LoRA
    worker reads them on a second core during the GEMMs. A decode step reads every active
    adapter once. Attention, norms, sampling and scheduling count as free, and the peak is
    measured with the weight in cache at 256 rows, so these are generous bounds, not estimates.

    ``n1000_vs_n1`` keeps n = 1 as fast as it ran and adds only the extra adapter bytes that
    n = 1000 must read (same tokens, same base work), in series on one thread; with the worker
    n = 1000 is bound only by reading all its adapter bytes, so the bound is near 1.
    """
    peak, bw = machine["peak_gemm_gflop_per_s"], machine["read_gb_per_s"]

    def floor_s(side: dict) -> float:
        compute, read = side["projection_gflop"] / peak, side["adapter_gb_read"] / bw
        return max(compute, read) if side.get("lora_worker") else compute + read

    def n1000_vs_n1(n1: dict | None, n1000: dict | None) -> float | None:
        if n1 is None or n1000 is None:
            return None
        n1_s = n1["makespan_s"]
        if n1000.get("lora_worker"):
            return round(n1_s / max(n1_s, n1000["adapter_gb_read"] / bw), 3)
        extra = max(0.0, n1000["adapter_gb_read"] - n1["adapter_gb_read"]) / bw
        return round(n1_s / (n1_s + extra), 3)

    sat = {n: results.get(f"saturated/engine_n{n}") for n in (1, 100, 1000)}
    out: dict[str, float] = {}
    for n, side in sat.items():
        if side is not None:
            best = side["requests"] / floor_s(side)
            out[f"engine_n{n}_req_per_s"] = round(best, 2)
            out[f"engine_n{n}_share_of_ceiling"] = round(side["req_per_s"] / best, 3)
    if sat[100] is not None:
        for mode in ("mixed", "swap"):
            peft = results.get(f"saturated/peft_{mode}")
            if peft is not None:
                out[f"engine_vs_peft_{mode}"] = round(out["engine_n100_req_per_s"]
                                                      / peft["req_per_s"], 3)
    for key, n1, n1000 in (("n1000_vs_n1", sat[1], sat[1000]),
                           ("n1000_vs_n1_no_worker", results.get("saturated/engine_n1_no_worker"),
                            results.get("saturated/engine_n1000_no_worker"))):
        bound = n1000_vs_n1(n1, n1000)
        if bound is not None:
            out[key] = bound
    return out


def peft_reference(model, trace: list[Request], indices: list[int], device: str
                   ) -> dict[int, list[int]]:
    """Unpadded batch-1 greedy outputs under set_adapter: the plain PEFT answer."""
    ref = {}
    for i in indices:
        model.set_adapter(f"a{trace[i].adapter(N_PEFT)}")
        ref[i] = peft_generate(model, [trace[i]], None, device, StepClock())[0]
    return ref


def match_share(a: list[Record], b: list[Record]) -> float:
    return round(sum(x.tokens == y.tokens for x, y in zip(a, b, strict=True)) / len(a), 4)


def checked_share(got: dict[int, list[int]], want: dict[int, list[int]],
                  check: list[int]) -> float:
    """Share of the checked requests whose greedy tokens agree."""
    return round(sum(got[i] == want[i] for i in check) / len(check), 4)


# -- main -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    # One thread by default: on the 2-vCPU machines this runs on, every side (engine and both
    # PEFT baselines) was faster single-threaded (quick mode: engine n1 134 vs 73 req/s, PEFT
    # mixed 29 vs 14), because each OpenMP region waits for a second vCPU that the host may
    # not schedule. All sides always use the same count; pass --threads 2 to compare.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="the model's, adapters' and KV cache's dtype, on every side "
                             "(float32: the exact comparison with PEFT)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-requests", type=int)
    parser.add_argument("--rate", type=float,
                        help="moderate-run arrival rate, req/s (default: half of engine_n100's "
                             "saturated throughput)")
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="power-law skew of the headline runs (1 = uniform)")
    parser.add_argument("--max-batch", type=int, default=32,
                        help="engine max_num_seqs and PEFT batch size (the same for fairness)")
    parser.add_argument("--max-batched-tokens", type=int, default=256)
    parser.add_argument("--slo-ttft", type=float,
                        help="TTFT target, s (default: 5x engine_n1's median TTFT at the "
                             "moderate rate)")
    parser.add_argument("--ranks", help="comma-separated ranks cycled over adapters "
                                        "(default: 64,32,16,8; quick 16,8,4,2)")
    parser.add_argument("--repeats", type=int,
                        help="runs of each saturated engine side, median kept (default: 5 "
                             "quick, 1 full; the PEFT sides run once, they take 5-20x longer)")
    parser.add_argument("--skip-moderate", action="store_true")
    parser.add_argument("--lora-worker", choices=sorted(LORA_WORKER), default="auto",
                        help="the engine's LoRA worker thread (auto: on where a core is spare "
                             "beyond --threads); full mode with the worker also runs n=1 and "
                             "n=1000 without it, for n1000_vs_n1_no_worker")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    warnings.filterwarnings("ignore")
    preset = QUICK if args.quick else FULL
    dtype = DTYPES[args.dtype]
    spec: ModelSpec = preset["model"]
    ranks = tuple(int(r) for r in args.ranks.split(",")) if args.ranks else preset["ranks"]
    repeats = args.repeats or preset["repeats"]
    num_requests = args.num_requests or preset["num_requests"]
    t_start = time.monotonic()

    tmp = tempfile.TemporaryDirectory(prefix="bench-serving-")
    ckpt = Path(tmp.name) / "model"
    hf_model = build_checkpoint(ckpt, spec, args.seed)
    hf_model.generation_config.eos_token_id = None  # generate to max_new_tokens, as ignore_eos
    hf_model.generation_config.pad_token_id = 0
    hf_model.to(dtype)
    params = sum(p.numel() for p in hf_model.parameters())
    shape = ModelShape.from_hf_config(hf_model.config.to_dict())
    bank = AdapterBank(1000, ranks, shape, spec.initializer_range, args.seed + 1,
                       dtype=dtype)
    log(f"model {params / 1e6:.1f}M params, adapters built ({time.monotonic() - t_start:.1f}s)")

    def trace(rate: float | None, alpha: float) -> list[Request]:
        return make_trace(num_requests, alpha, rate, 1.0, preset["input_range"],
                          preset["output_range"], spec.vocab_size, args.seed + 2)

    # Pool: KV of max_batch longest requests plus max_batch of the largest adapters, so a
    # full batch never waits on pool space (no preemption); idle adapters stay resident until
    # the pool fills, then go LRU.
    block = 16
    kv_pages = args.max_batch * -(-(preset["input_range"][1] + preset["output_range"][1]) // block)
    page_elems = spec.num_layers * 2 * block * shape.kv_dim
    adapter_pages = -(-bank.host_bytes(0) // dtype.itemsize // page_elems)
    num_pages = kv_pages + args.max_batch * adapter_pages + 8

    results: dict[str, dict] = {}
    records: dict[str, list[Record]] = {}

    def engine_run(n: int, tr: list[Request], slo: float | None,
                   lora_worker: bool | None = LORA_WORKER[args.lora_worker],
                   ) -> tuple[dict, list[Record]]:
        done = run_engine(make_engine(ckpt, bank, n, args, num_pages, lora_worker), tr, n, slo)
        # instrument() makes the engine a reference cycle: free it (its pool and packed
        # weights) now, not at some later collection, so runs do not pile up in peak RSS.
        gc.collect()
        return done

    def keep(key: str, done: list[tuple[dict, list[Record]]]) -> None:
        """Record the median run (by throughput) of a side."""
        done = sorted(done, key=lambda d: d[0]["req_per_s"])
        results[key], records[key] = done[len(done) // 2]
        r = results[key]
        if len(done) > 1:
            r["runs_req_per_s"] = [d[0]["req_per_s"] for d in done]
        log(f"{key}: {r['req_per_s']} req/s, ttft p90 {r['ttft_p90_s']}s, {r['steps']} steps, "
            f"{r['step_ms_mean']} ms/step ({time.monotonic() - t_start:.1f}s)")

    def engine_side(key: str, n: int, tr: list[Request], slo: float | None) -> None:
        keep(key, [engine_run(n, tr, slo)])

    # Saturated engine runs last a second or two in quick mode: the median of a few fresh-
    # engine runs, taken round-robin over n so that a slow spell of the shared machine hits
    # every side alike, keeps one scheduling hiccup out of the ratios.
    sat = trace(None, args.alpha)

    def saturated(ns: tuple[int, ...], suffix: str = "",
                  lora_worker: bool | None = LORA_WORKER[args.lora_worker]) -> None:
        runs: dict[int, list] = {n: [] for n in ns}
        for _ in range(repeats):
            for n in ns:
                runs[n].append(engine_run(n, sat, None, lora_worker))
        for n, done in runs.items():
            keep(f"saturated/engine_n{n}{suffix}", done)

    saturated((1, 100, 1000))
    worker_ran = results["saturated/engine_n1000"]["lora_worker"] is not None
    if worker_ran and not args.quick:
        # The same engine on one thread: what the worker's second core buys from 1 to 1000.
        saturated((1, 1000), "_no_worker", lora_worker=False)

    machine = batching_gain(hf_model, args.device)
    machine.update(machine_limits(spec.hidden_size, spec.intermediate_size, args.device,
                                  dtype))
    log(f"machine {machine}")
    peft_model = add_peft_adapters(hf_model, bank, N_PEFT).to(args.device, dtype)
    peft_bytes = sum(p.numel() * p.element_size() for p in peft_model.parameters())
    log(f"PEFT model with {N_PEFT} adapters ready ({time.monotonic() - t_start:.1f}s)")

    def peft_side(key: str, mode: str, tr: list[Request], slo: float | None) -> None:
        results[key], records[key] = run_peft(peft_model, tr, mode, args, slo)
        results[key]["model_mib"] = round(peft_bytes / 2**20, 2)
        r = results[key]
        log(f"{key}: {r['req_per_s']} req/s, ttft p90 {r['ttft_p90_s']}s, {r['batches']} "
            f"batches ({time.monotonic() - t_start:.1f}s)")

    peft_side("saturated/peft_mixed", "mixed", sat, None)
    peft_side("saturated/peft_swap", "swap", sat, None)

    # Correctness: the engine's greedy tokens against unpadded PEFT, and against the padded
    # mixed batch; and that adapters matter at all (n = 100 against n = 1's single adapter).
    step = max(1, num_requests // CHECK_REQUESTS)
    check = list(range(0, num_requests, step))[:CHECK_REQUESTS]
    ref = peft_reference(peft_model, sat, check, args.device)
    eng = records["saturated/engine_n100"]
    eng_tokens = {i: eng[i].tokens for i in check}
    ref_share = checked_share(eng_tokens, ref, check)
    correctness = {
        "outputs_match_peft": ref_share == 1.0,
        "match_share_vs_peft_unpadded": ref_share,
        "checked_requests": len(check),
        "match_share_vs_peft_mixed_batch": match_share(eng, records["saturated/peft_mixed"]),
        "match_share_vs_peft_swap_batch": match_share(eng, records["saturated/peft_swap"]),
        "outputs_differ_n100_vs_n1": round(1 - match_share(eng,
                                                           records["saturated/engine_n1"]), 4),
    }
    log(f"correctness {correctness}")

    rate = args.rate
    slo = args.slo_ttft
    if not args.skip_moderate:
        rate = rate or round(results["saturated/engine_n100"]["req_per_s"] / 2, 3)
        mod = trace(rate, args.alpha)
        engine_side("moderate/engine_n1", 1, mod, None)
        if slo is None:
            slo = round(5 * results["moderate/engine_n1"]["ttft_p50_s"], 4)
        ttft = [r.first - r.arrival for r in records["moderate/engine_n1"]]
        results["moderate/engine_n1"]["slo_attainment"] = round(
            sum(t <= slo for t in ttft) / len(ttft), 4)
        engine_side("moderate/engine_n100", 100, mod, slo)
        engine_side("moderate/engine_n1000", 1000, mod, slo)
        # PEFT swap is left out here: at this rate it is overloaded as in the saturated run,
        # and its replay would take as long again.
        peft_side("moderate/peft_mixed", "mixed", mod, slo)

    # Skew sweep (full mode): the engine against PEFT swap, the baseline skew helps most
    # (bigger one-adapter batches). Skew favours adapter a0, which has the largest rank.
    for alpha in preset["alphas"]:
        if alpha == args.alpha:
            continue
        tr = trace(None, alpha)
        keep(f"saturated_alpha{alpha}/engine_n100",
             [engine_run(100, tr, None) for _ in range(repeats)])
        peft_side(f"saturated_alpha{alpha}/peft_swap", "swap", tr, None)

    if dtype != torch.float32:
        # Rounding flips greedy picks of a random model, so two bf16 implementations need not
        # agree; which one stays closer to float32 (the same rounded weights, computed in
        # float32) is the measure of accuracy. Last, so PEFT is cast in place, not copied.
        exact = peft_reference(peft_model.float(), sat, check, args.device)
        correctness["float32_reference_match_share"] = {
            "engine_n100": checked_share(eng_tokens, exact, check),
            "peft_unpadded": checked_share(ref, exact, check)}
        log(f"float32 reference {correctness['float32_reference_match_share']}")

    def ratio(num: str, den: str, key: str = "req_per_s") -> float | None:
        if num not in results or den not in results:
            return None
        return round(results[num][key] / results[den][key], 3)

    ratios = {
        "engine_vs_peft_mixed": ratio("saturated/engine_n100", "saturated/peft_mixed"),
        "engine_vs_peft_swap": ratio("saturated/engine_n100", "saturated/peft_swap"),
        "n1000_vs_n1": ratio("saturated/engine_n1000", "saturated/engine_n1"),
        "n1000_vs_n1_no_worker": ratio("saturated/engine_n1000_no_worker",
                                       "saturated/engine_n1_no_worker"),
        "n100_vs_n1": ratio("saturated/engine_n100", "saturated/engine_n1"),
        "ttft_p90_engine_vs_peft_mixed": ratio("moderate/engine_n100", "moderate/peft_mixed",
                                               "ttft_p90_s"),
        "ttft_p90_n1000_vs_n1": ratio("moderate/engine_n1000", "moderate/engine_n1",
                                      "ttft_p90_s"),
    }
    for alpha in preset["alphas"]:
        if alpha != args.alpha:
            ratios[f"engine_vs_peft_swap_alpha{alpha}"] = ratio(
                f"saturated_alpha{alpha}/engine_n100", f"saturated_alpha{alpha}/peft_swap")
    ratios = {k: v for k, v in ratios.items() if v is not None}
    results["correctness"] = correctness
    results["machine"] = machine
    results["physical_limits"] = {key: physical_limits(side, machine)
                                  for key, side in results.items() if "forward_s" in side}
    results["ceilings"] = ceilings(results, machine)
    results["process_peak_rss_mib"] = round(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    results["total_wall_s"] = round(time.monotonic() - t_start, 2)

    itemsize = dtype.itemsize
    config = {
        "quick": args.quick, "device": args.device, "threads": torch.get_num_threads(),
        "seed": args.seed, "torch": torch.__version__, "dtype": args.dtype,
        "engine_saturated_repeats": repeats,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        "model": {**asdict(spec), "params": params,
                  "weights_mib": round(params * itemsize / 2**20, 2),
                  "family": "llama (random weights)"},
        "adapters": {
            "ranks_cycled": ranks, "target_modules": "all 7 (q,k,v,o,gate,up,down)",
            "n_engine": [1, 100, 1000], "n_peft": N_PEFT,
            "engine_n1_adapter": f"a{N1_ADAPTER} (rank {ranks[N1_ADAPTER]})",
            "ranks_note": "S-LoRA S2's ranks" if ranks == (64, 32, 16, 8) else
                          "scaled down from S-LoRA S2's {64, 32, 16, 8}",
            "mean_host_mib": round(sum(bank.host_bytes(i) for i in range(100)) / 100 / 2**20, 3),
            # S-LoRA's rank-64 q,k,v,o adapter on Llama-7B is ~1% of the base's bytes; at
            # these widths a rank is a far larger share, so adapters weigh much more per step.
            "largest_adapter_over_base_bytes": round(bank.host_bytes(0) / (params * itemsize), 4),
            "weights": "random, distinct per adapter (windows of one random buffer per rank); "
                       f"LoRA delta ~{bank.delta_ratio}x the base projection's output",
            "scaling": "folded into B (PEFT lora_alpha = r)",
        },
        "trace": {
            "num_requests": num_requests, "alpha": args.alpha, "cv": 1.0,
            "input_len_range": preset["input_range"], "output_len_range": preset["output_range"],
            "adapter_of_request": "floor(np.random.power(alpha) * n)",
            "saturated": "all requests arrive at t=0 (headline throughput ratios)",
            "moderate_rate_req_per_s": None if args.skip_moderate else rate,
            "decoding": "greedy, EOS ignored, fixed output length per request",
        },
        "engine": {"max_num_seqs": args.max_batch,
                   "lora_worker": args.lora_worker, "lora_worker_ran": worker_ran,
                   "lora_worker_note": "a second thread computing LoRA deltas during the base "
                                       "GEMMs, on the core torch's single thread leaves idle; "
                                       "PEFT cannot use it (2 torch threads measured slower "
                                       "than 1 for every side)",
                   "max_batched_tokens": args.max_batched_tokens, "block_size": block,
                   "num_pages": num_pages, "page_kib": page_elems * itemsize // 1024},
        "peft": {"batch_size": args.max_batch, "padding": "left",
                 "swap": "set_adapter between batches; all 100 adapters stay in the model, so "
                         "a swap is a switch, not S-LoRA's host-to-device load (favours PEFT)",
                 "adapter_setup": "get_peft_model for a0, LoraLayer.update_layer per module for "
                                  "the rest (add_adapter's per-module step, without its O(n) "
                                  "model walk per call)",
                 "max_new_tokens": "max output length in the batch",
                 "ttft": "first decode step of the request's batch (via a StoppingCriteria "
                         "clock), so it includes waiting for earlier batches",
                 "finish": "step that produced the request's last wanted token"},
        "slo_ttft_s": slo,
        "slo_rule": "--slo-ttft" if args.slo_ttft else "5x engine_n1 median TTFT, moderate run",
        "ttft_definition": "first token time minus the request's scheduled arrival time",
        "tpot_definition": "(finish - first token) / (output_len - 1), mean over requests",
        "step_time_share": "engine step wall time split by wrapping engine methods: schedule, "
                           "adapter_load (pool writes), lora_setup (the step's LoRA context: "
                           "per-token addresses of adapter rows in the pool, or, on the slot "
                           "path, adapters joining the batch copied into slot buffers), "
                           "forward, logits, other",
    }
    print(json.dumps({"benchmark": "serving", "config": config, "results": results,
                      "ratios": ratios}))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
