"""Adapter quality on a shipped task: base vs LoRA vs MoS vs Hydra (BENCHMARKS.md section 5).

Prints one JSON object: held-out exact match and loss of each method with its trainable
parameter count, and the headline ratios. All sides run in this process on the same base,
data order, seed and step budget.

    python bench/adapter_quality.py --quick        # under a minute on 2 CPU cores
    python bench/adapter_quality.py                # more steps, every shipped task's eval
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from adapterhub.basemodel import default_base_path  # noqa: E402
from adapterhub.checkpoints import load_base  # noqa: E402
from adapterhub.data import read_jsonl  # noqa: E402
from adapterhub.methods import create_adapter, make_config  # noqa: E402
from adapterhub.tasks import DEFAULT_TASK, task_path  # noqa: E402
from adapterhub.train import TrainConfig, Trainer, evaluate  # noqa: E402

# Same active rank for every method; MoS trades rank-8 LoRA's private vectors for a shared
# pool of e=2 vectors per layer (r/e = 4x fewer parameters), Hydra splits its rank 4 + 4.
METHODS = {
    "lora": {"r": 8, "alpha": 16},
    "mos": {"r": 8, "alpha": 16, "pool_vectors_per_layer": 2, "private_rank": 1,
            "shards_per_vector": 2},
    "hydra": {"r_parallel": 4, "r_sequential": 4, "alpha": 16},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--task", default=DEFAULT_TASK)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eval-records", type=int)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))

    steps = args.steps or (120 if args.quick else 400)
    n_eval = args.eval_records or (100 if args.quick else 200)
    train_cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-2, warmup_steps=10,
                            max_length=64, max_new_tokens=24, checkpoint_every=0,
                            eval_limit=n_eval)
    train = read_jsonl(task_path(args.task, "train"))
    held_out = read_jsonl(task_path(args.task, "eval"))[:n_eval]

    model, tok = load_base(default_base_path(), device=args.device)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    results["base"] = {**evaluate(model, tok, held_out, 64, 24), "trainable_params": 0}
    results["base"]["seconds"] = time.perf_counter() - t0
    for method, params in METHODS.items():
        t0 = time.perf_counter()
        # A fresh base per method: adapters are injected into the model in place.
        model, _ = load_base(default_base_path(), device=args.device)
        adapter = create_adapter(model, make_config(method, **params))
        metrics = Trainer(adapter, tok, train, train_cfg, eval_records=held_out,
                          progress=False).train()
        results[method] = {
            "exact_match": metrics["exact_match"], "eval_loss": metrics["eval_loss"],
            "final_train_loss": metrics["loss"],
            "trainable_params": adapter.num_trainable_parameters(),
            "seconds": time.perf_counter() - t0,
        }

    floor = 1.0 / len(held_out)  # the base often scores 0: compare against one hit
    lora, mos = results["lora"], results["mos"]
    out = {
        "benchmark": "adapter_quality",
        "config": {"task": args.task, "quick": args.quick, "steps": steps,
                   "eval_records": len(held_out), "train": train_cfg.to_dict(),
                   "methods": METHODS, "base_model": str(default_base_path()),
                   "device": args.device, "lora_accuracy_vs_base_floor": floor},
        "results": results,
        "ratios": {
            "mos_params_vs_lora": mos["trainable_params"] / lora["trainable_params"],
            "mos_accuracy_vs_lora": mos["exact_match"] / max(lora["exact_match"], floor),
            "hydra_accuracy_vs_lora": results["hydra"]["exact_match"]
            / max(lora["exact_match"], floor),
            "lora_accuracy_vs_base": lora["exact_match"]
            / max(results["base"]["exact_match"], floor),
        },
    }
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
