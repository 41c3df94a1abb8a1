"""The federated server loop and client handler, driven in-process (no Flower runtime).

An in-process grid delivers each train message to ``client_app.handle_train`` directly, so
dropouts, crashing clients, poisoned updates and a server restart are all deterministic.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from federated.client_app import handle_train
from federated.config import FedConfig
from federated.messages import ARRAYS, from_record, reply_content
from federated.rounds import run_federation

FAST = {"local-steps": 3, "batch-size": 4, "partition-size": 24, "client-eval-limit": 4,
        "eval-limit": 8, "max-new-tokens": 8, "method-params": '{"r": 4}'}


class InProcessGrid:
    """Nodes 1..n; ``behaviour[node]`` is "ok", "drop", "nan", "shape" or "crash"."""

    def __init__(self, overrides: dict, behaviour: dict[int, str], fail_at_round: int = 0):
        self.overrides, self.behaviour, self.fail_at_round = overrides, behaviour, fail_at_round
        self.rounds = 0

    def get_node_ids(self):
        return list(self.behaviour)

    def send_and_receive(self, messages, *, timeout=None):
        self.rounds += 1
        if self.rounds == self.fail_at_round:
            raise RuntimeError("server killed")
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            kind = self.behaviour[node]
            if kind == "drop":
                continue
            overrides = dict(self.overrides)
            if kind == "crash":
                overrides["task"] = "no-such-task"
            ctx = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": node - 1,
                                       "num-partitions": len(self.behaviour)})
            reply = handle_train(msg, ctx, overrides)
            if kind in ("nan", "shape"):
                update = from_record(reply.content[ARRAYS])
                key = sorted(update)[0]
                update[key] = (np.full_like(update[key], np.nan) if kind == "nan"
                               else np.zeros((1, 1), np.float32))
                reply = Message(reply_content(update, {"num-examples": 10.0}), reply_to=msg)
            replies.append(reply)
        return replies


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    # Flower stamps messages with the running task's identity, which its runtime sets.
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


def _overrides(tiny_llama, tmp_path, **extra) -> dict:
    return {**FAST, "base-model": str(tiny_llama), "data-dir": str(tmp_path / "data"),
            "checkpoint-dir": str(tmp_path / "ckpt"), **extra}


def test_round_tolerates_drop_crash_and_poisoned_updates(tiny_llama, tmp_path):
    overrides = _overrides(tiny_llama, tmp_path, **{"num-rounds": 1})
    behaviour = {1: "ok", 2: "ok", 3: "drop", 4: "nan", 5: "shape", 6: "crash"}
    cfg = FedConfig.from_run_config(overrides)
    summary = run_federation(InProcessGrid(overrides, behaviour), cfg)
    (rnd,) = summary.rounds
    assert rnd["clients"] == 2 and rnd["aggregated"] == 1
    assert rnd["clients_dropped"] == 1 and rnd["clients_failed"] == 1
    assert rnd["clients_rejected"] == 2
    assert rnd["bytes_up"] > 0 and rnd["bytes_down"] > 0
    assert summary.registered == "federated-adapter/1"


def test_round_below_min_clients_keeps_the_global(tiny_llama, tmp_path):
    overrides = _overrides(tiny_llama, tmp_path, **{"num-rounds": 1, "min-train-clients": 2})
    cfg = FedConfig.from_run_config(overrides)
    summary = run_federation(InProcessGrid(overrides, {1: "ok", 2: "nan"}), cfg)
    assert summary.rounds[0]["aggregated"] == 0
    assert all(not v.any() for k, v in summary.arrays.items() if "lora_B" in k)


@pytest.mark.parametrize("strategy", ["flora", "ffa-lora", "lora-fair"])
def test_each_strategy_runs_two_rounds(tiny_llama, tmp_path, strategy):
    overrides = _overrides(tiny_llama, tmp_path, **{"num-rounds": 2, "strategy": strategy})
    cfg = FedConfig.from_run_config(overrides)
    summary = run_federation(InProcessGrid(overrides, {1: "ok", 2: "ok"}), cfg)
    assert [r["aggregated"] for r in summary.rounds] == [1, 1]
    assert summary.registered
    if strategy == "flora":  # two rounds of two rank-4 clients: rank 16
        a = next(v for k, v in summary.arrays.items() if k.endswith("lora_A.weight"))
        assert a.shape[0] == 16
    if strategy == "ffa-lora":  # only B travels
        assert not any("lora_A" in k for k in summary.arrays)


def test_server_restart_resumes_from_the_last_global(tiny_llama, tmp_path):
    overrides = _overrides(tiny_llama, tmp_path, **{"num-rounds": 2})
    cfg = FedConfig.from_run_config(overrides)
    with pytest.raises(RuntimeError, match="server killed"):
        run_federation(InProcessGrid(overrides, {1: "ok", 2: "ok"}, fail_at_round=2), cfg)
    summary = run_federation(InProcessGrid(overrides, {1: "ok", 2: "ok"}), cfg)
    assert summary.resumed_from == 1
    assert [r["round"] for r in summary.rounds] == [2.0]
    from adapterhub.registry import Registry

    run = Registry(tmp_path / "data").client.get_run(summary.run_id)
    history = Registry(tmp_path / "data").client.get_metric_history(summary.run_id, "clients")
    assert sorted(m.step for m in history) == [1, 2]
    assert run.info.status == "FINISHED"
    # A finished run is not resumed: the next run starts from round 1 again.
    again = run_federation(InProcessGrid(overrides, {1: "ok", 2: "ok"}), cfg)
    assert again.resumed_from == 0 and again.run_id != summary.run_id


def test_config_rejects_bad_combinations():
    with pytest.raises(ValueError, match="does not support method 'mos'"):
        FedConfig.from_run_config({"method": "mos", "strategy": "flora"})
    with pytest.raises(ValueError, match="unknown run config key"):
        FedConfig.from_run_config({"num-round": 3})
    with pytest.raises(ValueError, match="min-train-clients"):
        FedConfig.from_run_config({"min-train-clients": 3, "min-available-clients": 2})


def test_final_adapter_is_pushed_to_a_running_server(tiny_llama, tmp_path, monkeypatch):
    loaded = []

    class FakeClient:
        def __init__(self, address):
            self.address = address

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def load_adapter(self, source, name=""):
            loaded.append((self.address, source, name))

    monkeypatch.setattr("adapterhub.client.Client", FakeClient)
    overrides = _overrides(tiny_llama, tmp_path, **{"num-rounds": 1, "eval-limit": 0,
                                                    "serve-address": "127.0.0.1:50051"})
    summary = run_federation(InProcessGrid(overrides, {1: "ok", 2: "ok"}),
                             FedConfig.from_run_config(overrides))
    assert loaded == [("127.0.0.1:50051", summary.registered, "federated-adapter")]
