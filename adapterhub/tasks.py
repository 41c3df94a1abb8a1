"""The shipped string-transformation tasks that adapters are trained and scored on.

Every record reads ``"<task>: <word> ="`` -> ``" <answer>"``; the completion is scored by
greedy exact match. Words are lowercase letters only. The shipped base model was pre-trained on
*other* transformations (copying, repeating, ...; see ``adapterhub.basemodel.corpus``), so it
knows the format but fails these tasks, typically by copying the word back.

Held-out exact match of a rank-8 LoRA on all linear layers of the shipped base (AdamW, cosine
schedule; the base scores 0.00 on every task):

* ``caesar``    - easy, the default: shift each letter one place (z wraps to a); 0.96-1.00
  after 60 steps of batch 16 at lr 5e-3 (the base knows the alphabet's order), 1.00 after 100.
* ``uppercase`` - easy: a per-character map; 0.86-0.97 after 60 steps, 0.99-1.00 after 100.
* ``reverse``   - medium: needs new attention positions; 0.90 after 200 steps of batch 32,
  0.97 after 300.
* ``sort``      - hard: letters in alphabetical order; about 0.8 after 300 steps of batch 32.

Regenerate the shipped splits (2000 train / 200 eval, seed 0) with ``python -m adapterhub.tasks``.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from adapterhub.data import Record

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TASKS_DIR = ASSETS_DIR / "tasks"
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    generator: Callable[[random.Random], Record]


def random_word(rng: random.Random, low: int, high: int) -> str:
    """A lowercase word with a length drawn uniformly from [low, high]."""
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(low, high)))


def _record(task: str, word: str, answer: str) -> Record:
    return Record(f"{task}: {word} =", f" {answer}")


def _uppercase(rng: random.Random) -> Record:
    word = random_word(rng, 3, 10)
    return _record("uppercase", word, word.upper())


def _shift(ch: str) -> str:
    return chr((ord(ch) - ord("a") + 1) % 26 + ord("a"))


def _caesar(rng: random.Random) -> Record:
    word = random_word(rng, 3, 10)
    return _record("caesar", word, "".join(_shift(c) for c in word))


def _reverse(rng: random.Random) -> Record:
    word = random_word(rng, 3, 8)
    return _record("reverse", word, word[::-1])


def _sort(rng: random.Random) -> Record:
    word = random_word(rng, 3, 8)
    return _record("sort", word, "".join(sorted(word)))


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("caesar", "shift every letter one place forward, z -> a (easy)", _caesar),
        TaskSpec("uppercase", "upper-case a lowercase word (easy)", _uppercase),
        TaskSpec("reverse", "write the word backwards (medium)", _reverse),
        TaskSpec("sort", "sort the letters alphabetically (hard)", _sort),
    )
}

# The task the demo and the benchmark train on: the one a rank-8 LoRA learns most reliably.
DEFAULT_TASK = "caesar"


def get_task(name: str) -> TaskSpec:
    """Look a task up by name; an unknown name raises ValueError listing the valid ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}") from None


def generate_records(name: str, n: int, seed: int) -> list[Record]:
    """``n`` records of task ``name`` with distinct prompts, deterministic for a given seed."""
    spec = get_task(name)
    rng = random.Random(f"{name}:{seed}")
    records: list[Record] = []
    seen: set[str] = set()
    # Prompts are distinct so that a train/eval split of one draw cannot leak across splits.
    while len(records) < n:
        record = spec.generator(rng)
        if record.prompt not in seen:
            seen.add(record.prompt)
            records.append(record)
    return records


def _write_jsonl(path: Path, records: list[Record]) -> None:
    lines = (json.dumps({"prompt": r.prompt, "completion": r.completion}) for r in records)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_task(name: str, out_dir: str | Path, n_train: int, n_eval: int, seed: int) -> Path:
    """Write ``train.jsonl`` and ``eval.jsonl`` (disjoint prompts) into ``out_dir``."""
    records = generate_records(name, n_train + n_eval, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_jsonl(out / "train.jsonl", records[:n_train])
    _write_jsonl(out / "eval.jsonl", records[n_train:])
    return out


def task_path(name: str, split: str = "train") -> Path:
    """Path of a shipped split: ``adapterhub/assets/tasks/<name>/<split>.jsonl``."""
    get_task(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return TASKS_DIR / name / f"{split}.jsonl"


def write_all_tasks(out_dir: str | Path = TASKS_DIR, n_train: int = 2000, n_eval: int = 200,
                    seed: int = 0) -> None:
    """Regenerate every shipped task under ``out_dir`` (what ships in the package)."""
    for name in TASKS:
        write_task(name, Path(out_dir) / name, n_train, n_eval, seed)


if __name__ == "__main__":
    write_all_tasks()
