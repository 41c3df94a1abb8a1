"""The shipped base model and tasks: offline loading, determinism, and the base failing a task."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from adapterhub.basemodel import default_base_path
from adapterhub.basemodel.probe import exact_match
from adapterhub.data import Record, read_jsonl
from adapterhub.tasks import (
    DEFAULT_TASK,
    TASKS,
    generate_records,
    get_task,
    task_path,
    write_task,
)


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(2)
    path = default_base_path()
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def test_shipped_base_is_a_safetensors_llama(base):
    model, tokenizer = base
    files = {p.name for p in default_base_path().iterdir()}
    assert "model.safetensors" in files and "config.json" in files
    assert not {"pytorch_model.bin", "model.bin"} & files
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in files)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.padding_side == "left"


def test_generation_is_deterministic_for_a_seed():
    for name in TASKS:
        assert generate_records(name, 20, seed=3) == generate_records(name, 20, seed=3)
        assert generate_records(name, 20, seed=3) != generate_records(name, 20, seed=4)


def test_write_task_splits_are_disjoint(tmp_path):
    out = write_task(DEFAULT_TASK, tmp_path / "t", n_train=50, n_eval=10, seed=1)
    train, evals = read_jsonl(out / "train.jsonl"), read_jsonl(out / "eval.jsonl")
    assert (len(train), len(evals)) == (50, 10)
    assert not {r.prompt for r in train} & {r.prompt for r in evals}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_shipped_splits_exist_and_do_not_overlap(name):
    train, evals = read_jsonl(task_path(name, "train")), read_jsonl(task_path(name, "eval"))
    assert len(train) >= 1000 and len(evals) >= 100
    assert not {r.prompt for r in train} & {r.prompt for r in evals}
    # Shipped files are the generator's output, so the records follow the task's format.
    assert all(r.prompt.startswith(f"{name}: ") and r.prompt.endswith(" =") for r in evals)
    first = json.loads(task_path(name, "train").read_text().splitlines()[0])
    assert set(first) == {"prompt", "completion"}


def test_unknown_task_raises_listing_valid_names():
    with pytest.raises(ValueError, match=DEFAULT_TASK):
        get_task("nope")
    with pytest.raises(ValueError, match="valid tasks"):
        generate_records("nope", 1, 0)
    with pytest.raises(ValueError):
        task_path("nope", "train")


def test_base_fails_the_default_task(base):
    model, tokenizer = base
    records = read_jsonl(task_path(DEFAULT_TASK, "eval"))[:50]
    assert exact_match(model, tokenizer, records) < 0.2


def test_base_knows_the_format(base):
    # The corpus skill adapters build on: copying a word back after the prompt.
    model, tokenizer = base
    words = [r.prompt.split()[1] for r in read_jsonl(task_path(DEFAULT_TASK, "eval"))[:20]]
    records = [Record(f"copy: {w} =", f" {w}") for w in words]
    assert exact_match(model, tokenizer, records) > 0.8
