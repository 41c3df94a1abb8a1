"""One fine-tune job end to end: data, base, adapter, training, evaluation, MLflow, registry.

The CLI, the job service and the benchmark all call :func:`run_finetune`; what a job did is
recorded in one MLflow run and its adapter is registered as a new model version.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adapterhub.data import Record, read_jsonl
from adapterhub.errors import AdapterHubError, DatasetError
from adapterhub.train.config import TrainConfig

EXPERIMENT = "finetune"


@dataclass
class FinetuneJob:
    name: str
    method: str = "lora"
    method_params: dict = field(default_factory=dict)
    base: str | None = None  # checkpoint directory; None = the shipped base model
    task: str | None = None  # a shipped task instead of files
    train_file: str | None = None
    eval_file: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    quantize: str | None = None
    device: str = "cpu"
    aliases: list[str] = field(default_factory=list)
    eval_base: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneJob:
        d = dict(d)
        d["train"] = TrainConfig.from_dict(d.get("train", {}))
        return cls(**d)


@dataclass
class FinetuneResult:
    run_id: str
    name: str
    version: int
    adapter_dir: Path
    metrics: dict[str, float]
    base_metrics: dict[str, float]


def base_path(job: FinetuneJob) -> Path:
    if job.base:
        return Path(job.base).expanduser()
    from adapterhub.basemodel import default_base_path

    return default_base_path()


def load_records(job: FinetuneJob) -> tuple[list[Record], list[Record]]:
    """Train and held-out records; without an eval set the last tenth of train is held out."""
    if job.task:
        from adapterhub.tasks import task_path

        train = read_jsonl(task_path(job.task, "train"))
        return train, read_jsonl(task_path(job.task, "eval"))
    if not job.train_file:
        raise DatasetError("no training data: give a dataset file or a shipped task")
    train = read_jsonl(job.train_file)
    if job.eval_file:
        return train, read_jsonl(job.eval_file)
    if len(train) < 10:
        raise DatasetError(f"{job.train_file}: need at least 10 records to hold some out")
    cut = len(train) - max(1, len(train) // 10)
    return train[:cut], train[cut:]


def _job_dir(data_dir: Path, name: str) -> Path:
    return data_dir / "jobs" / name


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def run_finetune(
    job: FinetuneJob,
    data_dir: str | Path | None = None,
    registry=None,
    progress: bool = True,
    resume: bool = True,
    on_step: Callable[[dict[str, float], int], None] | None = None,
) -> FinetuneResult:
    """Train, evaluate, log and register one adapter; resumes an interrupted job of that name.

    ``on_step(metrics, step)`` sees every logged metric set (a job service streams them and
    may raise from it to cancel the job).
    """
    from adapterhub import settings
    from adapterhub.checkpoints import load_base, read_base_config
    from adapterhub.methods import create_adapter, make_config
    from adapterhub.registry import Registry, validate_name
    from adapterhub.train import Trainer, evaluate

    validate_name(job.name)
    data_dir = settings.data_dir(data_dir)
    method_config = make_config(job.method, **job.method_params)
    train_records, eval_records = load_records(job)
    base_dir = base_path(job)
    read_base_config(base_dir)
    registry = registry or Registry(data_dir)

    out = _job_dir(data_dir, job.name)
    state_file = out / "job.json"
    previous = json.loads(state_file.read_text()) if state_file.is_file() else None
    resuming = bool(resume and previous and previous.get("status") == "running"
                    and previous.get("job") == job.to_dict())
    if not resuming and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    model, tokenizer = load_base(base_dir, quantize=job.quantize, device=job.device)
    eval_set = eval_records[: job.train.eval_limit]
    base_metrics: dict[str, float] = {}
    params = {
        "method": job.method, "base_model": str(base_dir), "quantize": job.quantize or "none",
        "dataset": job.task or job.train_file, "train_records": len(train_records),
        "eval_records": len(eval_set),
        **{f"method.{k}": v for k, v in method_config.to_dict().items()},
        **{f"train.{k}": v for k, v in job.train.to_dict().items()},
    }
    run_ctx = (registry.resume_run(previous["run_id"]) if resuming
               else registry.start_run(EXPERIMENT, run_name=job.name, params=params,
                                       tags={"adapter_name": job.name, "method": job.method}))
    with run_ctx as run:
        state_file.write_text(json.dumps(
            {"status": "running", "run_id": run.run_id, "job": job.to_dict()}, indent=1))
        if job.eval_base and not resuming:
            base_metrics = evaluate(model, tokenizer, eval_set, job.train.max_length,
                                    job.train.max_new_tokens)
            run.log_metrics({f"base_{k}": v for k, v in base_metrics.items()})
        adapter = create_adapter(model, method_config)
        run.log_metrics({"trainable_params": adapter.num_trainable_parameters()})
        def log(metrics: dict[str, float], step: int) -> None:
            run.log_metrics(metrics, step)
            if on_step is not None:
                on_step(metrics, step)

        trainer = Trainer(adapter, tokenizer, train_records, job.train, eval_records=eval_set,
                          output_dir=out, log=log, progress=progress)
        if resuming:
            trainer.resume()
        t0 = time.perf_counter()
        start_step = trainer.step
        metrics = trainer.train()
        seconds = time.perf_counter() - t0
        adapter_dir = out / "adapter"
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        adapter.save(adapter_dir)
        adapter.export_peft_lora(adapter_dir / "peft_lora")
        steps_run = trainer.step - start_step
        tokens = sum(h["tokens_per_s"] for h in trainer.history[-steps_run:]) if steps_run else 0
        summary = {
            "adapter_bytes": _dir_bytes(adapter_dir) - _dir_bytes(adapter_dir / "peft_lora"),
            "train_seconds": seconds,
            "train_tokens_per_s": tokens / max(steps_run, 1),
        }
        run.log_metrics(summary)
        run.log_adapter(adapter_dir)
        version = run.register_adapter(
            job.name, aliases=job.aliases,
            tags={"method": job.method, "base_model": str(base_dir)},
        )
        state_file.write_text(json.dumps(
            {"status": "finished", "run_id": run.run_id, "version": version.version,
             "job": job.to_dict()}, indent=1))
    return FinetuneResult(run.run_id, job.name, int(version.version), adapter_dir,
                          {**metrics, **summary}, base_metrics)


__all__ = ["AdapterHubError", "FinetuneJob", "FinetuneResult", "run_finetune"]
