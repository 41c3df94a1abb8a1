"""One fine-tune job end to end: data, base, adapter, training, evaluation, MLflow, registry.

The CLI, the job service and the benchmark all call :func:`run_finetune`; what a job did is
recorded in one MLflow run and its adapter is registered as a new model version.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from adapterhub.data import Record, read_jsonl
from adapterhub.errors import AdapterHubError, DatasetError
from adapterhub.train.config import TrainConfig

EXPERIMENT = "finetune"
# Where a job trains: "co_serve" inside a serving engine's iterations, "dedicated" on its own
# copy of the base model, "auto" lets the job service choose (co-serving while it can).
PLACEMENTS = ("auto", "co_serve", "dedicated")
# Fields that say where and how a job runs, not what it trains: a job resumed under another
# placement is the same job.
_RUN_FIELDS = ("placement", "serve_checkpoints_as")


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
    placement: str = "auto"
    # Co-served jobs only: serve each checkpoint under this adapter name while training.
    serve_checkpoints_as: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneJob:
        d = dict(d)
        d["train"] = TrainConfig.from_dict(d.get("train", {}))
        return cls(**d)


def same_job(saved: dict | None, job: FinetuneJob) -> bool:
    """Whether a job dict saved earlier (maybe by an older version) trains what ``job`` does."""
    if not isinstance(saved, dict):
        return False
    try:
        old = FinetuneJob.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        return False
    new = job.to_dict()
    for key in _RUN_FIELDS:
        old.pop(key, None)
        new.pop(key, None)
    return old == new


class FinetuneBackend(Protocol):
    """Where a job's training runs. The default trains on its own copy of the base model;
    a serving engine trains inside its iterations over its resident weights. The data
    order, seed and hyper-parameters, and so the adapter, are the same either way."""

    def load_base(self, job: FinetuneJob, base_dir: Path) -> tuple[Any, Any]:
        """(model, tokenizer) to inject the job's adapter into."""

    def make_trainer(self, adapter: Any, tokenizer: Any, train_records: Sequence[Record],
                     config: TrainConfig, eval_records: Sequence[Record], output_dir: Path,
                     log: Callable[[dict[str, float], int], None], progress: bool) -> Any:
        """An object with Trainer's ``resume()``, ``train()``, ``step`` and ``history``."""


class LocalTraining:
    """The default backend: load the base model and train with adapterhub's Trainer."""

    def load_base(self, job: FinetuneJob, base_dir: Path) -> tuple[Any, Any]:
        from adapterhub.checkpoints import load_base

        return load_base(base_dir, quantize=job.quantize, device=job.device)

    def make_trainer(self, adapter, tokenizer, train_records, config, eval_records,
                     output_dir, log, progress):
        from adapterhub.train import Trainer

        return Trainer(adapter, tokenizer, train_records, config, eval_records=eval_records,
                       output_dir=output_dir, log=log, progress=progress)


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
    backend: FinetuneBackend | None = None,
) -> FinetuneResult:
    """Train, evaluate, log and register one adapter; resumes an interrupted job of that name.

    ``on_step(metrics, step)`` sees every logged metric set (a job service streams them and
    may raise from it to cancel the job). ``backend`` says where training runs (default:
    here, on a freshly loaded base model).
    """
    import torch

    from adapterhub import settings
    from adapterhub.checkpoints import read_base_config
    from adapterhub.methods import create_adapter, make_config
    from adapterhub.registry import Registry, validate_name
    from adapterhub.train import evaluate

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
                    and same_job(previous.get("job"), job))
    if not resuming and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    backend = backend or LocalTraining()
    model, tokenizer = backend.load_base(job, base_dir)
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
        # Seeded, so the same job gives the same adapter wherever (and however often) it runs.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(job.train.seed)
            adapter = create_adapter(model, method_config)
        run.log_metrics({"trainable_params": adapter.num_trainable_parameters()})
        def log(metrics: dict[str, float], step: int) -> None:
            run.log_metrics(metrics, step)
            if on_step is not None:
                on_step(metrics, step)

        trainer = backend.make_trainer(adapter, tokenizer, train_records, job.train, eval_set,
                                       out, log, progress)
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


__all__ = ["AdapterHubError", "FinetuneBackend", "FinetuneJob", "FinetuneResult",
           "LocalTraining", "run_finetune", "same_job"]
