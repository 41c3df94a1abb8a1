"""A federation in Flower's simulation engine (Ray): 3 non-IID clients, 3 rounds.

Uses the shipped base model when it is built (then the adapter must beat the base's exact
match); on the tiny random test model only the held-out loss can improve, so that is checked.
"""

from __future__ import annotations

import pytest

from adapterhub.basemodel import default_base_path
from adapterhub.registry import Registry
from federated.data import bucket_of, client_records


def test_partitions_are_disjoint_and_non_iid():
    parts = [client_records("caesar", 3, i, 0.5, 0)[0] for i in range(3)]
    prompts = [{r.prompt for r in p} for p in parts]
    assert sum(len(p) for p in prompts) == 2000
    assert not (prompts[0] & prompts[1]) and not (prompts[1] & prompts[2])
    letters = [{bucket_of(r) for r in p} for p in parts]
    counts = [[sum(bucket_of(r) == c for r in p) for c in "abcdefghijklmnopqrstuvwxyz"]
              for p in parts]
    # Label skew: some letter is at least 3x more frequent on one client than on another.
    assert any(max(col) > 3 * max(1, min(col)) for col in zip(*counts, strict=True))
    assert all(letters)


@pytest.mark.slow
def test_simulation_three_clients_three_rounds(tiny_llama, tmp_path):
    from federated.simulation import simulate

    shipped = (default_base_path() / "config.json").is_file()
    overrides = {
        "base-model": str(default_base_path() if shipped else tiny_llama),
        "data-dir": str(tmp_path / "data"), "checkpoint-dir": str(tmp_path / "ckpt"),
        "num-rounds": 3, "min-train-clients": 3, "min-available-clients": 3,
        "local-steps": 20 if shipped else 5, "batch-size": 16 if shipped else 4,
        "partition-size": 0 if shipped else 32, "client-eval-limit": 8, "eval-limit": 50,
        "method-params": '{"r": 8, "alpha": 16}', "max-new-tokens": 12,
    }
    summary = simulate(overrides, num_clients=3)
    assert [r["clients"] for r in summary.rounds] == [3, 3, 3]
    assert summary.registered == "federated-adapter/1"
    version = Registry(tmp_path / "data").resolve_version("federated-adapter/1")
    assert version.run_id == summary.run_id
    first, last = summary.initial_eval, summary.rounds[-1]
    assert last["global_eval_loss"] < first["global_eval_loss"]
    if shipped:
        assert last["global_exact_match"] > first["global_exact_match"]


def test_data_owner_file_wins_over_the_task(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(f'{{"prompt": "p{i}", "completion": " c{i}"}}\n' for i in range(20)))
    train, held = client_records("caesar", 3, 0, 0.5, 0, data_path=str(path))
    assert [r.prompt for r in train] == [f"p{i}" for i in range(18)]
    assert [r.prompt for r in held] == ["p18", "p19"]
