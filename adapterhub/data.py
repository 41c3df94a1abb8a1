"""Prompt/completion JSONL datasets and their tokenization (loss on completion tokens only)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from adapterhub.errors import DatasetError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Record:
    prompt: str
    completion: str


def read_jsonl(path: str | Path) -> list[Record]:
    """Read prompt/completion records; any bad line raises DatasetError naming its number."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}")
    records: list[Record] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        records.append(parse_record(line, f"{path}:{lineno}"))
    if not records:
        raise DatasetError(f"dataset {path} has no records")
    return records


def parse_record(line: str | dict, where: str) -> Record:
    """Validate one record (a JSON line or an already-decoded dict)."""
    if isinstance(line, str):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: invalid JSON ({exc.msg})") from None
    else:
        obj = line
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected an object with 'prompt' and 'completion'")
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str):
            raise DatasetError(f"{where}: field {key!r} must be a string")
    if not obj["completion"]:
        raise DatasetError(f"{where}: field 'completion' is empty")
    return Record(obj["prompt"], obj["completion"])


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt as the model sees it at inference: BOS then the prompt."""
    return [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]


def encode_example(
    tokenizer: PreTrainedTokenizerBase, record: Record, max_length: int
) -> tuple[list[int], list[int]]:
    """Return (input_ids, labels): BOS prompt completion EOS, labels masked on the prompt."""
    prompt_ids = encode_prompt(tokenizer, record.prompt)
    completion_ids = tokenizer(record.completion, add_special_tokens=False).input_ids
    completion_ids.append(tokenizer.eos_token_id)
    ids = (prompt_ids + completion_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
    return ids, labels


def collate(
    examples: Sequence[tuple[list[int], list[int]]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training; padded positions are masked out of attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
