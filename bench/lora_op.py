"""Heterogeneous batched LoRA operator micro-benchmark (BENCHMARKS.md section 4).

Prints one JSON object. Per (tokens, k adapters, module shape) it times:
- ours: the operator the engine runs on this device. On CPU in float32 that is the native
  kernel reading adapters in place (lora_pool.py); elsewhere the torch operator.
- torch_operator: the torch operator over packed weights (the engine's slot-buffer path).
- loop: a per-adapter Python loop (index each adapter's tokens, two matmuls), as PEFT's mixed
  batch does.
- gather_bmm: gather+bmm over weights padded to the largest rank (the vLLM/Punica torch
  fallback).
- base_gemm: the base GEMM x @ W^T the delta rides on.
Ranks cycle over {64, 32, 16, 8} as in S-LoRA's S2; the engine numbers slots in rank order, and
`ours_slots_unordered` shows the torch operator's cost of not doing so. All sides run
round-robin in this process on the same inputs; medians after a warm-up.

    python bench/lora_op.py --quick                 # under 30 s on 2 CPU cores
    python bench/lora_op.py                         # 15 repeats, adds the 2816 -> 1024 shape
    python bench/lora_op.py --device cuda           # bf16 by default on CUDA
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from serving.engine import kernels, lora_meta, lora_op  # noqa: E402
from serving.engine.adapter_store import build_host_adapter  # noqa: E402
from serving.engine.layout import ModelShape  # noqa: E402
from serving.engine.lora_op import LoraBatchMeta, apply_lora, pack_lora_weights  # noqa: E402
from serving.engine.lora_pool import PoolLoraContext, adapter_rows  # noqa: E402

RANKS = (64, 32, 16, 8)
SHAPES = {"attn": (1024, 1024), "mlp": (1024, 2816)}
FULL_SHAPES = {**SHAPES, "mlp_down": (2816, 1024)}
MODULE_OF = {"attn": "q_proj", "mlp": "up_proj", "mlp_down": "down_proj"}
# One layer whose q_proj, up_proj and down_proj have the shapes above.
POOL_SHAPE = ModelShape(num_layers=1, hidden_size=1024, intermediate_size=2816, num_heads=16,
                        num_kv_heads=16, head_dim=64, vocab_size=8)
BARE_SHARE = 1 / 8  # share of sequences on the bare base model (slot -1)


def token_slots(workload: str, k: int, rng: random.Random) -> list[int]:
    """Flattened like the engine: prefill segments first, then one token per decoding sequence."""
    def pick() -> int:
        return -1 if rng.random() < BARE_SHARE else rng.randrange(k)
    prefill = [] if workload == "decode" else [160, 128, 96, 64]
    slots = [s for n in prefill for s in [pick()] * n]
    return slots + [pick() for _ in range(64)]


def loop_baseline(y, x, slots, adapters):
    for a in torch.unique(slots[slots >= 0]).tolist():
        idx = (slots == a).nonzero().squeeze(1)
        A, B = adapters[a]
        y.index_add_(0, idx, (x[idx] @ A.T) @ B.T)
    return y


def padded_weights(adapters, r_max):
    """[k + 1, r_max, d_in] and [k + 1, d_out, r_max]; the extra zero adapter serves slot -1."""
    k, (A0, B0) = len(adapters), adapters[0]
    Ap = A0.new_zeros(k + 1, r_max, A0.shape[1])
    Bp = B0.new_zeros(k + 1, B0.shape[0], r_max)
    for i, (A, B) in enumerate(adapters):
        Ap[i, :A.shape[0]] = A
        Bp[i, :, :A.shape[0]] = B
    return Ap, Bp


def gather_bmm_baseline(y, x, idx, Ap, Bp):
    h = torch.einsum("ti,tri->tr", x, Ap[idx])  # vLLM torch_ops bgmv_shrink
    y += torch.einsum("tr,tor->to", h, Bp[idx])  # bgmv_expand
    return y


def time_round_robin(fns: dict[str, Callable[[], object]], repeats: int, device: str,
                     before: Callable[[], object] = lambda: None):
    """``before`` runs untimed ahead of every call: it brings the shared inputs into cache, so
    no side pays for the traffic of the one before it (gather_bmm streams tens of MiB)."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            before()
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def run_case(workload, k, shape, args, dtype, rng) -> dict:
    d_in, d_out = FULL_SHAPES[shape]
    dev = args.device
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(dev, dtype)
    ranks = sorted((RANKS[i % len(RANKS)] for i in range(k)), reverse=True)  # engine numbering
    adapters = [(randn(r, d_in, scale=d_in**-0.5), randn(d_out, r, scale=r**-0.5)) for r in ranks]
    slots_list = token_slots(workload, k, rng)
    T = len(slots_list)
    slots = torch.tensor(slots_list, device=dev)
    x, W, y = randn(T, d_in), randn(d_out, d_in, scale=d_in**-0.5), randn(T, d_out)

    t0 = time.perf_counter()  # host planning per step: the batch metadata and its plan
    meta = LoraBatchMeta.build(slots_list, ranks, dev, cost_dim=d_in + d_out)
    plan = meta.segments(meta.plan(tuple(ranks)))
    meta_ms = (time.perf_counter() - t0) * 1e3
    w = pack_lora_weights([(A, B, None) for A, B in adapters])
    Ap, Bp = padded_weights(adapters, max(ranks))
    idx = torch.where(slots >= 0, slots, k)
    torch_operator = lambda y: apply_lora(y, x, w, meta)  # noqa: E731
    fns = {
        "torch_operator": lambda: torch_operator(y),
        "loop": lambda: loop_baseline(y, x, slots, adapters),
        "gather_bmm": lambda: gather_bmm_baseline(y, x, idx, Ap, Bp),
        "base_gemm": lambda: F.linear(x, W),
    }
    if k > len(RANKS):  # slots numbered as ranks cycle: rank groups are gathered per call
        by_rank = {r: [i for i in range(k) if ranks[i] == r] for r in set(ranks)}
        perm = [by_rank[RANKS[j % len(RANKS)]].pop(0) for j in range(k)]  # cycled -> sorted
        inv = {p: j for j, p in enumerate(perm)}
        w_cyc = pack_lora_weights([(*adapters[p], None) for p in perm])
        meta_cyc = LoraBatchMeta.build([inv[s] if s >= 0 else -1 for s in slots_list],
                                       [ranks[p] for p in perm], dev, cost_dim=d_in + d_out)
        fns["ours_slots_unordered"] = lambda: apply_lora(y, x, w_cyc, meta_cyc)
    lib = kernels.bgmv_lib() if kernels.bgmv_usable(x, y) else None
    ours = torch_operator  # what the engine runs on this device
    if lib is not None:  # CPU float32: the kernel, reading adapters in place
        key = (0, MODULE_OF[shape])
        host = [build_host_adapter(f"a{i}", {key: (A, B, None)}, POOL_SHAPE)
                for i, (A, B) in enumerate(adapters)]
        rows = [adapter_rows(h, h.flat, [key]) for h in host]
        t0 = time.perf_counter()
        ctx = PoolLoraContext(lib, slots_list, rows, [key], d_in + d_out)
        meta_ms = (time.perf_counter() - t0) * 1e3
        ours = lambda y: ctx.apply(*key, x, y)  # noqa: E731
        fns["ours"] = lambda: ours(y)
    with torch.inference_mode():
        # Same answer as the loop, or the timing means nothing.
        check = (ours(torch.zeros_like(y))
                 - loop_baseline(torch.zeros_like(y), x, slots, adapters)).abs().max().item()
        ms = time_round_robin(fns, args.repeats, dev, before=lambda: (x.sum(), y.sum()))
    ms.setdefault("ours", ms["torch_operator"])  # the same operator: timed once
    if lib is not None:
        path = f"native kernel, {sum(len(v) for v in ctx.runs.values())} GEMM runs"
    elif plan.dense:
        path = "dense"
    elif lora_op._use_grouped_mm(x, w):
        path = f"grouped_mm x{len(plan.groups)}"
    else:
        path = "segmented " + " ".join(
            f"r{g.rank}:w{g.width}+{len(g.overflow)}" for g in plan.groups)
    base = ms["base_gemm"]
    return {
        "T": T, "k": k, "shape": shape, "d_in": d_in, "d_out": d_out, "path": path,
        "bare_tokens": slots_list.count(-1), "sum_rank": sum(ranks),
        "max_abs_diff_vs_loop": check,
        "ms": {n: round(v, 4) for n, v in ms.items()}, "meta_build_ms": round(meta_ms, 4),
        "op_vs_loop": round(ms["ours"] / ms["loop"], 4),
        "op_vs_gather_bmm": round(ms["ours"] / ms["gather_bmm"], 4),
        "op_share_of_base_gemm": round(ms["ours"] / base, 4),
        "op_vs_torch_operator": round(ms["ours"] / ms["torch_operator"], 4),
        "base_gemm_gflops": round(2 * T * d_in * d_out / base / 1e6, 2),
    }


def geomean(xs: list[float]) -> float:
    return round(math.exp(sum(math.log(v) for v in xs) / len(xs)), 4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int)
    # One thread by default: on a shared machine, a descheduled OpenMP thread stalls the other
    # at every barrier and swings 2-thread timings tenfold.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    args.repeats = args.repeats or (3 if args.quick else 15)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda")
                                          else "float32"))
    ks = (1, 8, 64)
    shapes = SHAPES if args.quick else FULL_SHAPES
    cases = [(wl, k, sh) for wl in ("decode", "prefill") for k in ks for sh in shapes]
    rng = random.Random(args.seed)
    rows = [run_case(wl, k, sh, args, dtype, rng) for wl, k, sh in cases]

    ratios = {}
    for k in ks:
        mine = [r for r in rows if r["k"] == k]
        for key in ("op_vs_loop", "op_vs_gather_bmm", "op_share_of_base_gemm",
                    "op_vs_torch_operator"):
            ratios[f"{key}_k{k}"] = geomean([r[key] for r in mine])
    print(json.dumps({
        "benchmark": "lora_op",
        "config": {
            "quick": args.quick, "device": args.device, "dtype": str(dtype).split(".")[1],
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "repeats": args.repeats, "ranks_cycled": RANKS, "shapes": shapes, "k": ks,
            "workloads": {"decode": "64 decode tokens",
                          "prefill": "prefill segments 160+128+96+64, then 64 decode tokens"},
            "bare_share": BARE_SHARE, "dense_max_sum_rank": lora_meta.DENSE_MAX_SUM_RANK,
            "dense_max_waste": lora_meta.DENSE_MAX_WASTE,
            "ratio_aggregation": "geometric mean over the workloads and shapes of each k",
        },
        "results": {f"{r['shape']}_T{r['T']}_k{r['k']}": r for r in rows},
        "ratios": ratios,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
