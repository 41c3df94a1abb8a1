"""Federated adapter training benchmark: strategies vs centralized training, bytes per round.

    python bench/federated.py [--quick] [--base PATH]

Each strategy trains a LoRA (and MoS under FedIT) with 3 clients on non-IID shares of the
default task through the real server loop and client handler (in-process transport, no Ray,
so the numbers measure the algorithms, not the runtime). Centralized training runs the same
number of sequential steps on the union of the clients' data. Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adapterhub.basemodel import default_base_path  # noqa: E402
from adapterhub.data import read_jsonl  # noqa: E402
from adapterhub.tasks import DEFAULT_TASK, task_path  # noqa: E402
from adapterhub.train import Trainer, evaluate  # noqa: E402
from federated import task  # noqa: E402
from federated.config import FedConfig  # noqa: E402
from federated.data import client_records  # noqa: E402
from federated.local import LocalGrid  # noqa: E402
from federated.rounds import run_federation  # noqa: E402

LORA = '{"r": 8, "alpha": 16}'
# e = 2 pool vectors per layer: a quarter of rank-8 LoRA's parameters (MoS's sharing).
MOS = '{"r": 8, "alpha": 16, "pool_vectors_per_layer": 2, "private_rank": 1}'
RUNS = [("fedit", "lora", LORA), ("flora", "lora", LORA), ("ffa-lora", "lora", LORA),
        ("lora-fair", "lora", LORA), ("fedit", "mos", MOS)]


def _held_out(cfg: FedConfig) -> list:
    return read_jsonl(task_path(cfg.task, "eval"))[: cfg.eval_limit]


def centralized(cfg: FedConfig, clients: int) -> dict:
    """One adapter trained on all clients' records for rounds × local steps."""
    train = [r for i in range(clients) for r in client_records(
        cfg.task, clients, i, cfg.partition_alpha, cfg.seed, cfg.partition_size)[0]]
    model, tok = task.fresh_base(cfg)
    adapter = task.seeded_adapter(model, cfg, cfg.seed)
    tc = cfg.train_config(0)
    tc.steps = cfg.num_rounds * cfg.local_steps
    t0 = time.perf_counter()
    Trainer(adapter, tok, train, tc, progress=False).train()
    result = evaluate(adapter, tok, _held_out(cfg), cfg.max_length, cfg.max_new_tokens)
    return {"exact_match": result["exact_match"], "eval_loss": result["eval_loss"],
            "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and eval records")
    ap.add_argument("--base", default="", help="base checkpoint (default: the shipped one)")
    ap.add_argument("--clients", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    base = Path(args.base) if args.base else default_base_path()
    if not (base / "config.json").is_file():
        raise SystemExit(f"base model not found at {base}; build it or pass --base")
    rounds, steps, eval_limit = (3, 20, 50) if args.quick else (5, 30, 200)
    common = {"base-model": str(base), "task": DEFAULT_TASK, "num-rounds": rounds,
              "local-steps": steps, "batch-size": 16, "lr": 5e-3, "eval-limit": eval_limit,
              "client-eval-limit": 0, "eval-every": 0, "max-new-tokens": 12, "partition-alpha": 0.5,
              "min-train-clients": args.clients, "min-available-clients": args.clients}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy, method, params in RUNS:
            name = f"{strategy}/{method}"
            overrides = {**common, "strategy": strategy, "method": method,
                         "method-params": params, "data-dir": f"{tmp}/data",
                         "checkpoint-dir": f"{tmp}/{strategy}-{method}",
                         "adapter-name": f"bench-{strategy}-{method}"}
            t0 = time.perf_counter()
            summary = run_federation(LocalGrid(overrides, args.clients),
                                     FedConfig.from_run_config(overrides))
            last = summary.rounds[-1]
            per_round = [r["bytes_up"] + r["bytes_down"] for r in summary.rounds]
            results[name] = {
                "exact_match": last["global_exact_match"], "eval_loss": last["global_eval_loss"],
                "bytes_per_round": sum(per_round) / len(per_round),
                "bytes_up_per_round": sum(r["bytes_up"] for r in summary.rounds) / rounds,
                "seconds": round(time.perf_counter() - t0, 2),
            }
        base_cfg = FedConfig.from_run_config({**common, "strategy": "flora"})
        results["base"] = task.evaluate_global(base_cfg, {}, _held_out(base_cfg))
        results["centralized/lora"] = centralized(
            FedConfig.from_run_config({**common, "method-params": LORA}), args.clients)
    central = results["centralized/lora"]["exact_match"]
    lora_runs = [v["exact_match"] for k, v in results.items() if k.endswith("/lora")
                 and not k.startswith("centralized")]
    out = {
        "benchmark": "federated",
        "config": {"quick": args.quick, "base": str(base), "task": DEFAULT_TASK,
                   "clients": args.clients, "rounds": rounds, "local_steps": steps,
                   "eval_records": eval_limit, "partition": "dirichlet(0.5) over first letter",
                   "transport": "in-process grid (real server loop and client handler)"},
        "results": results,
        "ratios": {
            "best_strategy_vs_centralized": round(max(lora_runs) / central, 3) if central
            else None,
            "mos_bytes_vs_lora": round(results["fedit/mos"]["bytes_per_round"]
                                       / results["fedit/lora"]["bytes_per_round"], 3),
            "mos_accuracy_vs_lora": round(results["fedit/mos"]["exact_match"]
                                          / results["fedit/lora"]["exact_match"], 3)
            if results["fedit/lora"]["exact_match"] else None,
        },
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
