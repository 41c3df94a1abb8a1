"""Client data: a data owner's JSONL file, or a non-IID share of a shipped task (simulation).

The simulated split is label-skewed like real federations: records are bucketed by the first
letter of their word and each bucket is spread over the clients with Dirichlet(alpha)
proportions, so small alpha gives clients mostly disjoint alphabets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adapterhub.data import Record, read_jsonl
from adapterhub.tasks import task_path


def bucket_of(record: Record) -> str:
    """The first letter of the word in ``"<task>: <word> ="``."""
    word = record.prompt.split(":", 1)[-1].strip()
    return word[:1] or "?"


def dirichlet_partition(
    records: list[Record], num_partitions: int, partition_id: int, alpha: float, seed: int,
) -> list[Record]:
    """Partition ``partition_id`` of a Dirichlet-over-buckets split (deterministic, disjoint)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
    rng = np.random.default_rng(seed)
    buckets: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        buckets.setdefault(bucket_of(record), []).append(i)
    mine: list[int] = []
    for key in sorted(buckets):
        idx = buckets[key]
        shares = rng.dirichlet([alpha] * num_partitions)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).round().astype(int)
        mine.extend(np.split(np.asarray(idx), cuts)[partition_id].tolist())
    return [records[i] for i in sorted(mine)]


def client_records(
    task: str, num_partitions: int, partition_id: int, alpha: float, seed: int,
    limit: int = 0, data_path: str = "",
) -> tuple[list[Record], list[Record]]:
    """(train, eval) records of one client; a data owner's ``data_path`` wins over the task.

    A local file is split 90/10 into train and held-out records by position.
    """
    if data_path:
        records = read_jsonl(Path(data_path))
        cut = max(1, len(records) * 9 // 10)
        return records[:cut], records[cut:]
    train = dirichlet_partition(read_jsonl(task_path(task, "train")), num_partitions,
                                partition_id, alpha, seed)
    held = dirichlet_partition(read_jsonl(task_path(task, "eval")), num_partitions,
                               partition_id, alpha, seed)
    return (train[:limit] if limit else train), held
