"""A job's training data: one source (task, file or inline records), checked before queuing.

Files must lie inside the allowed roots (a server must not read arbitrary paths), and every
line is parsed up front so a bad record is reported at submission, naming its line.
Inline records are written as JSONL next to the job so it can be re-run after a restart.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from adapterhub.data import Record, parse_record, read_jsonl
from adapterhub.errors import DatasetError
from adapterhub.finetune import FinetuneJob
from adapterhub.jobs.errors import DatasetNotAllowedError

MAX_INLINE_RECORDS = 100_000
MIN_TRAIN_WITHOUT_EVAL = 10  # run_finetune holds out a tenth of train when no eval set is given

InlineRecords = Sequence[Record | Mapping[str, object]]


@dataclass
class DatasetPlan:
    """A checked dataset: resolved files and/or validated inline records."""

    train_file: Path | None = None
    eval_file: Path | None = None
    train_records: list[Record] | None = None
    eval_records: list[Record] | None = None


def check_dataset(
    spec: FinetuneJob,
    train_records: InlineRecords | None,
    eval_records: InlineRecords | None,
    allowed_roots: Sequence[Path] | None,
    max_records: int = MAX_INLINE_RECORDS,
) -> DatasetPlan:
    """Validate the data sources of ``spec`` plus inline records; write nothing."""
    sources = {"a shipped task": spec.task, "a dataset file": spec.train_file,
               "inline records": train_records}
    given = [what for what, value in sources.items() if value is not None]
    if len(given) != 1:
        got = ", ".join(given) if given else "none"
        raise DatasetError(
            "give exactly one training data source: a shipped task, a dataset file or inline "
            f"records (got: {got})"
        )
    if spec.eval_file is not None and eval_records is not None:
        raise DatasetError("give at most one eval source: an eval file or inline eval records")
    plan = DatasetPlan()
    if spec.task is not None:
        from adapterhub.tasks import get_task

        get_task(spec.task)
        if spec.eval_file is not None or eval_records is not None:
            raise DatasetError(f"task {spec.task!r} brings its own eval split; give no eval set")
        return plan
    n_train = 0
    if spec.train_file is not None:
        plan.train_file = allowed_path(spec.train_file, allowed_roots, "dataset")
        n_train = len(read_jsonl(plan.train_file))
    else:
        plan.train_records = check_records(train_records, "train", max_records)
        n_train = len(plan.train_records)
    if spec.eval_file is not None:
        plan.eval_file = allowed_path(spec.eval_file, allowed_roots, "eval dataset")
        read_jsonl(plan.eval_file)
    elif eval_records is not None:
        plan.eval_records = check_records(eval_records, "eval", max_records)
    elif n_train < MIN_TRAIN_WITHOUT_EVAL:
        raise DatasetError(
            f"need at least {MIN_TRAIN_WITHOUT_EVAL} training records to hold some out for "
            f"evaluation, got {n_train} (or give an eval set)"
        )
    return plan


def allowed_path(path: str | Path, roots: Sequence[Path] | None, role: str) -> Path:
    """The resolved path, if it lies inside one of ``roots`` (any path when roots is None).

    Relative paths are taken from the first root, so clients need not know where it is.
    Symlinks are resolved first, so a link cannot lead outside the roots.
    """
    raw = Path(path).expanduser()
    if not raw.is_absolute() and roots:
        raw = Path(roots[0]) / raw
    resolved = raw.resolve()
    if roots is not None:
        resolved_roots = [Path(r).expanduser().resolve() for r in roots]
        if not any(resolved.is_relative_to(r) for r in resolved_roots):
            # The allowed roots are named, but not whether the path exists.
            raise DatasetNotAllowedError(
                f"{role} {str(path)!r} is outside the directories this server may read "
                f"({', '.join(str(r) for r in resolved_roots) or 'none'})"
            )
    if not resolved.is_file():
        raise DatasetError(f"{role} not found: {path}")
    return resolved


def check_records(records: InlineRecords, split: str, max_records: int) -> list[Record]:
    """Validate inline records; errors name the record by its 1-based position."""
    if isinstance(records, str | bytes | Mapping):
        raise DatasetError(f"inline {split} records must be a list of records")
    records = list(records)
    if not records:
        raise DatasetError(f"inline {split} records: the list is empty")
    if len(records) > max_records:
        raise DatasetError(
            f"inline {split} records: {len(records)} is more than the {max_records} allowed; "
            "put larger datasets in a file"
        )
    out: list[Record] = []
    for i, record in enumerate(records, start=1):
        if isinstance(record, Record):
            record = {"prompt": record.prompt, "completion": record.completion}
        elif isinstance(record, Mapping):
            record = dict(record)
        out.append(parse_record(record, f"inline {split} record {i}"))
    return out


def materialize(plan: DatasetPlan, spec: FinetuneJob, out_dir: Path) -> FinetuneJob:
    """Write inline records under ``out_dir``; return the spec pointing at resolved files."""
    train_file, eval_file = plan.train_file, plan.eval_file
    if plan.train_records is not None:
        train_file = _write_jsonl(out_dir / "train.jsonl", plan.train_records)
    if plan.eval_records is not None:
        eval_file = _write_jsonl(out_dir / "eval.jsonl", plan.eval_records)
    if spec.task is not None:
        return spec
    return replace(spec, train_file=str(train_file),
                   eval_file=str(eval_file) if eval_file is not None else None)


def _write_jsonl(path: Path, records: list[Record]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n")
    tmp.replace(path)  # a crash never leaves a half-written dataset under the final name
    return path.resolve()

