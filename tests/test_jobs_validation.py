"""Submission checks: every bad spec or dataset is refused with a precise message, unqueued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapterhub.data import Record
from adapterhub.errors import AdapterHubError, CheckpointError, DatasetError, RegistryError
from adapterhub.jobs import DatasetNotAllowedError, JobManager, JobState
from tests.test_jobs_support import records, spec, write_jsonl


@pytest.fixture
def manager(tiny_llama, tmp_path) -> JobManager:
    roots = [tmp_path / "datasets"]
    write_jsonl(roots[0] / "train.jsonl")
    return JobManager(tmp_path / "jobs.db", tmp_path / "data", base_model=str(tiny_llama),
                      allowed_dataset_roots=roots, max_inline_records=50)


def _malformed_file(tmp_path: Path) -> Path:
    path = write_jsonl(tmp_path / "datasets" / "bad.jsonl")
    lines = path.read_text().splitlines()
    lines[2] = '{"prompt": "x", '
    path.write_text("\n".join(lines))
    return path


CASES = {
    "unknown method": (lambda t: (spec("x", method="dora"), records()),
                       ValueError, "unknown adapter method 'dora'; valid methods: lora"),
    "bad hyper-parameter": (lambda t: (spec("x", method_params={"rank": 4}), records()),
                            ValueError, r"unknown lora hyperparameter\(s\) \['rank'\]"),
    "bad hyper-parameter value": (lambda t: (spec("x", method_params={"r": -1}), records()),
                                  ValueError, "r must be an integer >= 1, got -1"),
    "bad name": (lambda t: (spec("bad name!"), records()), RegistryError,
                 "invalid adapter name 'bad name!'"),
    "bad alias": (lambda t: (spec("x", aliases=["latest"]), records()), RegistryError,
                  "'latest' and 'v<N>' are reserved"),
    "bad quantization": (lambda t: (spec("x", quantize="int3"), records()), CheckpointError,
                         "unknown quantization 'int3'"),
    "missing base": (lambda t: (spec("x", base=str(t / "nobase")), records()), CheckpointError,
                     "base model directory not found"),
    "no data": (lambda t: (spec("x"), None), DatasetError,
                "give exactly one training data source.*got: none"),
    "two sources": (lambda t: (spec("x", task="uppercase"), records()), DatasetError,
                    "got: a shipped task, inline records"),
    "unknown task": (lambda t: (spec("x", task="juggle"), None), ValueError,
                     "unknown task 'juggle'"),
    "missing file": (lambda t: (spec("x", train_file=str(t / "datasets" / "nope.jsonl")), None),
                     DatasetError, "dataset not found: .*nope.jsonl"),
    "outside roots": (lambda t: (spec("x", train_file=str(write_jsonl(t / "secret.jsonl"))),
                                 None), DatasetNotAllowedError,
                      "'.*secret.jsonl' is outside the directories this server may read"),
    "symlink out of roots": (lambda t: (spec("x", train_file=str(_link(t))), None),
                             DatasetNotAllowedError, "outside the directories"),
    "dotdot out of roots": (lambda t: (spec("x", train_file="../secret.jsonl"), None),
                            DatasetNotAllowedError, "outside the directories"),
    "malformed jsonl": (lambda t: (spec("x", train_file=str(_malformed_file(t))), None),
                        DatasetError, r"bad\.jsonl:3: invalid JSON"),
    "malformed inline record": (
        lambda t: (spec("x"), [*records(12), {"prompt": "p", "completion": 3}]),
        DatasetError, "inline train record 13: field 'completion' must be a string"),
    "empty completion": (lambda t: (spec("x"), [Record("p", "")] * 12), DatasetError,
                         "inline train record 1: field 'completion' is empty"),
    "too many inline records": (lambda t: (spec("x"), records(51)), DatasetError,
                                "51 is more than the 50 allowed"),
    "too few to hold out": (lambda t: (spec("x"), records(5)), DatasetError,
                            "need at least 10 training records"),
    "bad steps": (lambda t: (_with_steps(spec("x"), 0), records()), ValueError,
                  "steps must be positive, got 0"),
}


def _link(tmp_path: Path) -> Path:
    link = tmp_path / "datasets" / "link.jsonl"
    link.symlink_to(write_jsonl(tmp_path / "outside.jsonl"))
    return link


def _with_steps(job, steps):
    job.train.steps = steps  # mutated after construction: still caught at submission
    return job


@pytest.mark.parametrize("case", list(CASES))
def test_bad_submissions_are_refused_before_queuing(manager, tmp_path, case):
    make, error, message = CASES[case]
    job_spec, inline = make(tmp_path)
    with pytest.raises(error, match=message) as info:
        manager.submit(job_spec, train_records=inline)
    assert isinstance(info.value, ValueError | AdapterHubError)
    assert "\n" not in str(info.value)
    assert manager.list() == []
    assert not (manager.data_dir / "jobs-data").exists()


def test_bad_eval_records_are_refused(manager):
    with pytest.raises(DatasetError, match="inline eval record 2: invalid JSON"):
        manager.submit(spec("x"), records(), eval_records=[Record("a", "b"), "{oops"])
    with pytest.raises(DatasetError, match="task 'uppercase' brings its own eval split"):
        manager.submit(spec("x", task="uppercase"), eval_records=records())
    assert manager.list() == []


def test_inline_records_are_written_and_the_spec_points_at_them(manager, tiny_llama):
    job = manager.submit(spec("ok"), records(12), eval_records=[{"prompt": "a", "completion": "b"}])
    assert job.state == JobState.QUEUED and job.total_steps == 3
    data = manager.data_dir / "jobs-data" / job.id
    assert job.spec.train_file == str(data / "train.jsonl")
    assert job.spec.eval_file == str(data / "eval.jsonl")
    assert job.spec.base == str(tiny_llama.resolve())  # the manager's base model by default
    lines = (data / "train.jsonl").read_text().splitlines()
    assert len(lines) == 12 and json.loads(lines[0]) == {"prompt": "rev ab0 =",
                                                         "completion": " 0ba"}
    assert manager.get(job.id).spec.to_dict() == job.spec.to_dict()


def test_relative_paths_are_taken_from_the_first_root(manager, tmp_path):
    job = manager.submit(spec("rel", train_file="train.jsonl"))
    assert job.spec.train_file == str((tmp_path / "datasets" / "train.jsonl").resolve())
