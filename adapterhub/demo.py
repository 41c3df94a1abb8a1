"""The main job on the embedded default: fine-tune, track, register, resolve, export, compare.

Runs offline on the shipped base model and a shipped task with a SQLite-backed MLflow in the
data directory, and prints what a user would check: the task accuracy of the base model
and of the new adapter, the registry entry, and where the UI is.
"""

from __future__ import annotations

from pathlib import Path


def _say(text: str) -> None:
    print(f"==> {text}", flush=True)


def run_demo(data_dir: str | Path | None, steps: int = 150, name: str = "demo-adapter") -> int:
    from peft import PeftModel

    from adapterhub import settings
    from adapterhub.basemodel import default_base_path
    from adapterhub.checkpoints import load_base
    from adapterhub.data import read_jsonl
    from adapterhub.finetune import FinetuneJob, run_finetune
    from adapterhub.registry import Registry
    from adapterhub.tasks import DEFAULT_TASK, TASKS, task_path
    from adapterhub.train import TrainConfig, evaluate, greedy_complete

    root = settings.data_dir(data_dir)
    registry = Registry(root)
    _say(f"data directory {root} (MLflow: {registry.tracking_uri})")
    _say(f"base model {default_base_path()}; task '{DEFAULT_TASK}': "
         f"{TASKS[DEFAULT_TASK].description}")
    job = FinetuneJob(name=name, method="lora", method_params={"r": 8, "alpha": 16},
                      task=DEFAULT_TASK, train=TrainConfig(steps=steps), aliases=["production"])
    result = run_finetune(job, root, registry=registry)
    base_em = result.base_metrics["exact_match"]
    tuned_em = result.metrics["exact_match"]
    _say(f"exact match on held-out '{DEFAULT_TASK}': base {base_em:.3f} -> adapter "
         f"{tuned_em:.3f} (eval loss {result.base_metrics['eval_loss']:.3f} -> "
         f"{result.metrics['eval_loss']:.3f}); MLflow run {result.run_id}")

    _say("registry:")
    for a in registry.list_adapters():
        aliases = ", ".join(f"{k}->v{v}" for k, v in sorted(a.aliases.items()))
        print(f"    {a.name}  latest v{a.latest_version}  method {a.method}  aliases {aliases}")
    resolved = registry.resolve(f"{name}@production")
    _say(f"{name}@production resolves to {resolved}")

    export_dir = root / "exports" / name
    from adapterhub.commands import _export

    _export(resolved, export_dir, None)
    model, tok = load_base(default_base_path())
    peft_model = PeftModel.from_pretrained(model, str(export_dir))
    records = read_jsonl(task_path(DEFAULT_TASK, "eval"))[:100]
    peft_em = evaluate(peft_model, tok, records)["exact_match"]
    _say(f"stock PEFT loading the exported LoRA scores {peft_em:.3f} on 100 held-out records")
    for r, out in zip(records[:3], greedy_complete(peft_model, tok, [r.prompt for r in records[:3]],
                                                   32), strict=True):
        print(f"    {r.prompt!r} -> {out!r} (expected {r.completion!r})")
    _say(f"MLflow UI: adapterhub ui --data-dir {root}  (then open http://127.0.0.1:5000)")
    if tuned_em <= base_em:
        _say("the adapter did not improve on the base model")
        return 1
    return 0
