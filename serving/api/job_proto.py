"""Fine-tune job messages <-> adapterhub values (FinetuneJob, Record, the job manager's Job)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, struct_pb2

from adapterhub.data import Record
from adapterhub.errors import RegistryError
from adapterhub.finetune import FinetuneJob
from adapterhub.registry.refs import validate_alias, validate_name
from adapterhub.train.config import TrainConfig
from adapterhub.v1 import finetune_pb2
from serving.api.status import ApiError

METHODS = ("lora", "mos", "hydra")
STATES = {
    "queued": finetune_pb2.JOB_STATE_QUEUED,
    "running": finetune_pb2.JOB_STATE_RUNNING,
    "succeeded": finetune_pb2.JOB_STATE_SUCCEEDED,
    "failed": finetune_pb2.JOB_STATE_FAILED,
    "cancelled": finetune_pb2.JOB_STATE_CANCELLED,
}
STATE_NAMES = {v: k for k, v in STATES.items()}
PLACEMENTS = {
    "auto": finetune_pb2.PLACEMENT_UNSPECIFIED,
    "co_serve": finetune_pb2.PLACEMENT_CO_SERVE,
    "dedicated": finetune_pb2.PLACEMENT_DEDICATED,
}
PLACEMENT_NAMES = {v: k for k, v in PLACEMENTS.items()}
FINAL = {"succeeded", "failed", "cancelled"}
# TrainingParams fields where 0 means "unset" (proto3 cannot tell them apart).
TRAIN_FIELDS = ("steps", "batch_size", "grad_accum", "lr", "max_length", "seed",
                "checkpoint_every", "eval_every")


def _invalid(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _plain(value: Any) -> Any:
    # Struct numbers are doubles; hyper-parameters such as r must arrive as ints.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _records(msg: finetune_pb2.InlineRecords) -> list[Record]:
    return [Record(r.prompt, r.completion) for r in msg.records]


def _checked(check, value: str) -> str:
    try:
        return check(value)
    except RegistryError as exc:
        raise _invalid(str(exc)) from None


def _base(requested: str, server_base: str | None) -> None:
    if not requested:
        return
    if server_base is not None:
        ours = Path(server_base)
        if requested in (str(ours), ours.name) or Path(requested).expanduser().resolve() == (
                ours.expanduser().resolve()):
            return
    raise _invalid(f"base_model {requested!r}: this server fine-tunes only the base model it "
                   "serves; leave base_model empty")


def spec_from_proto(spec: finetune_pb2.FineTuneJobSpec, server_base: str | None = None
                    ) -> tuple[FinetuneJob, list[Record] | None, list[Record] | None]:
    """Validate a job spec; returns the job and any inline train / eval records."""
    name = _checked(validate_name, spec.output_name)
    method = spec.method or "lora"
    if method not in METHODS:
        raise _invalid(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    params = _plain(json_format.MessageToDict(spec.method_params))
    ds = spec.dataset
    source = ds.WhichOneof("source")
    if source is None:
        raise _invalid("dataset needs a source: path, task or inline records")
    train_records = _records(ds.records) if source == "records" else None
    if train_records is not None and not train_records:
        raise _invalid("dataset.records is empty")
    eval_source = ds.WhichOneof("eval_source")
    eval_records = _records(ds.eval_records) if eval_source == "eval_records" else None
    t = spec.training
    given = {f: getattr(t, f) for f in TRAIN_FIELDS if getattr(t, f)}
    if given.get("seed", 0) >= 2**63:
        raise _invalid("training.seed must be below 2**63")
    if "lr" in given and not math.isfinite(given["lr"]):
        raise _invalid("training.lr must be finite")
    try:
        train = TrainConfig(**given)
    except ValueError as exc:
        raise _invalid(f"training: {exc}") from None
    _base(spec.base_model, server_base)
    if spec.quantize not in ("", "nf4"):
        raise _invalid(f"quantize must be empty or 'nf4', got {spec.quantize!r}")
    if spec.placement not in PLACEMENT_NAMES:
        raise _invalid(f"unknown placement {spec.placement}")
    serve_as = spec.serve_checkpoints_as or None
    if serve_as is not None and serve_as != f"{name}@latest":
        _checked(validate_name, serve_as)
    job = FinetuneJob(
        name=name, method=method, method_params=params,
        task=ds.task if source == "task" else None,
        train_file=ds.path if source == "path" else None,
        eval_file=ds.eval_path if eval_source == "eval_path" else None,
        train=train, quantize=spec.quantize or None,
        aliases=[_checked(validate_alias, a) for a in spec.aliases],
        placement=PLACEMENT_NAMES[spec.placement], serve_checkpoints_as=serve_as)
    return job, train_records, eval_records


def spec_to_proto(d: dict) -> finetune_pb2.FineTuneJobSpec:
    spec = finetune_pb2.FineTuneJobSpec(
        output_name=d.get("name", ""), method=d.get("method", ""),
        base_model=d.get("base") or "", quantize=d.get("quantize") or "",
        aliases=list(d.get("aliases") or []),
        placement=PLACEMENTS.get(d.get("placement") or "auto", 0),
        serve_checkpoints_as=d.get("serve_checkpoints_as") or "")
    params = json.loads(json.dumps(d.get("method_params") or {}, default=str))
    spec.method_params.CopyFrom(_struct(params))
    if d.get("task"):
        spec.dataset.task = d["task"]
    elif d.get("train_file"):
        spec.dataset.path = str(d["train_file"])
    if d.get("eval_file"):
        spec.dataset.eval_path = str(d["eval_file"])
    train = d.get("train") or {}
    for f in TRAIN_FIELDS:
        if train.get(f) is not None:
            setattr(spec.training, f, train[f])
    return spec


def _struct(d: dict) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(d)
    return s


def _number(x: Any) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else 0.0


def job_state(job: Any) -> str:
    return str(getattr(job.state, "value", job.state))


def job_to_proto(job: Any) -> finetune_pb2.FineTuneJob:
    spec = job.spec.to_dict() if hasattr(job.spec, "to_dict") else dict(job.spec)
    return finetune_pb2.FineTuneJob(
        id=job.id, spec=spec_to_proto(spec), state=STATES.get(job_state(job), 0),
        step=job.step or 0, total_steps=job.total_steps or 0, loss=_number(job.loss),
        tokens_per_s=_number(job.tokens_per_s), error=job.error or "",
        mlflow_run_id=job.run_id or "", adapter_ref=job.adapter_ref or "",
        metrics={k: _number(v) for k, v in (job.metrics or {}).items()},
        created_at=_number(job.created_at), updated_at=_number(job.updated_at),
        placement=PLACEMENTS.get(getattr(job, "placement", None) or "auto", 0))
