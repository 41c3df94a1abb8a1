"""Helpers shared by the tests/test_jobs_*.py files (this module holds no tests)."""

from __future__ import annotations

import json
from pathlib import Path

from adapterhub.data import Record
from adapterhub.finetune import FinetuneJob
from adapterhub.train import TrainConfig

WORDS = ["ab", "cd", "efg", "hi", "jkl", "mn"]


def records(n: int = 20) -> list[Record]:
    out = []
    for i in range(n):
        w = WORDS[i % len(WORDS)] + str(i % 5)
        out.append(Record(f"rev {w} =", f" {w[::-1]}"))
    return out


def write_jsonl(path: Path, n: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": r.prompt, "completion": r.completion}) + "\n"
                            for r in records(n)))
    return path


def spec(name: str, steps: int = 3, **kwargs) -> FinetuneJob:
    train = dict(steps=steps, batch_size=4, checkpoint_every=0, warmup_steps=1,
                 max_new_tokens=4, eval_limit=4)
    train.update(kwargs.pop("train", {}))
    kwargs.setdefault("eval_base", False)
    return FinetuneJob(name=name, train=TrainConfig(**train), **kwargs)
