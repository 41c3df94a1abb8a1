"""A real `mlflow server` over the registry: REST API sees local runs; remote clients resolve."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from adapterhub.registry import Registry
from adapterhub.registry.server import free_port, group_alive, start_ui, stop
from tests.test_registry import fill_of, write_fake_adapter


def _get(url: str, path: str, **query: str) -> dict[str, Any]:
    full = f"{url}{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(full, timeout=10) as response:
        return json.loads(response.read())


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.timeout(120)
def test_ui_server_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTERHUB_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "data"
    local = Registry(data_dir=data)
    with local.start_run("sft", run_name="local", params={"lr": 0.01}) as run:
        run.log_metrics({"loss": 0.25}, step=3)
        run.log_adapter(write_fake_adapter(tmp_path / "a1", 1.0))
        run.register_adapter("served", aliases=["prod"])

    proc = start_ui(data, host="127.0.0.1", port=free_port())
    try:
        url = proc.url
        got = _get(url, "/api/2.0/mlflow/runs/get", run_id=run.run_id)["run"]
        assert got["info"]["status"] == "FINISHED"
        assert {"key": "lr", "value": "0.01"} in got["data"]["params"]
        [metric] = got["data"]["metrics"]
        assert (metric["key"], metric["value"], metric["step"]) == ("loss", 0.25, 3)
        experiment_id = got["info"]["experiment_id"]
        found = _post(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
        assert [r["info"]["run_id"] for r in found["runs"]] == [run.run_id]

        model = _get(url, "/api/2.0/mlflow/registered-models/get", name="served")
        assert model["registered_model"]["aliases"] == [{"alias": "prod", "version": "1"}]
        versions = _get(url, "/api/2.0/mlflow/model-versions/search", filter="name='served'")
        [mv] = versions["model_versions"]
        assert (mv["version"], mv["run_id"]) == ("1", run.run_id)
        assert {"key": "method", "value": "lora"} in mv["tags"]

        # A client of the server: its artifacts go through the server's proxy, so resolving
        # them downloads into the client's own cache.
        remote = Registry(data_dir=tmp_path / "client", tracking_uri=url)
        with remote.start_run("remote-sft") as run2:
            run2.log_adapter(write_fake_adapter(tmp_path / "a2", 5.0))
            assert run2.adapter_uri.startswith("mlflow-artifacts:")
            version = run2.register_adapter("served")
        assert version.version == 2
        cached = remote.resolve("served")
        assert cached == tmp_path / "client" / "cache" / "served" / "2"
        assert fill_of(cached) == 5.0
        assert remote.resolve("served") == cached  # second time straight from the cache
        assert fill_of(remote.resolve("served@prod")) == 1.0
        assert [s.latest_version for s in remote.list_adapters()] == [2]
        # The proxied upload landed in the data directory, next to the local runs.
        assert list((data / "artifacts").rglob("adapter_model.safetensors"))
    finally:
        stop(proc)
    assert proc.returncode is not None
    assert not group_alive(proc.pid)
    assert (data / "logs" / "ui.log").is_file()
