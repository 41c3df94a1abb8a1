"""Registry over a local SQLite store: runs, registering versions, aliases and resolving refs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub.errors import AdapterError, RegistryError
from adapterhub.registry import Registry

NAME = "demo-lora"


def write_fake_adapter(path: Path, fill: float, method: str = "lora") -> Path:
    """A tiny PEFT-layout adapter whose single tensor is filled with `fill`."""
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "adapterhub_method": method,
        "base_model_name_or_path": "tiny-llama",
        "r": 2,
        "target_modules": ["q_proj"],
    }
    (path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    tensor = torch.full((2, 4), fill)
    save_file({"base_model.model.layers.0.q_proj.lora_A.weight": tensor},
              str(path / "adapter_model.safetensors"))
    return path


def fill_of(adapter_dir: Path) -> float:
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return float(next(iter(tensors.values()))[0, 0])


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """One registry with NAME at versions 1 (fill 1.0, alias prod) and 2 (fill 2.0, staging)."""
    root = tmp_path_factory.mktemp("registry")
    registry = Registry(data_dir=root / "data")
    for fill, alias in ((1.0, "prod"), (2.0, "staging")):
        adapter = write_fake_adapter(root / f"adapter{int(fill)}", fill)
        with registry.start_run("sft", run_name=f"run{int(fill)}", params={"lr": 1e-3, "r": 2},
                                tags={"purpose": "test"}) as run:
            run.log_metrics({"loss": 2.0 / fill}, step=1)
            run.log_metrics({"loss": 1.0 / fill, "acc": 0.5}, step=2)
            uri = run.log_adapter(adapter)
            assert uri.endswith("/adapter")
            version = run.register_adapter(NAME, aliases=[alias], tags={"dataset": "toy"})
        assert version.version == int(fill) and version.aliases == [alias]
        assert version.method == "lora" and version.base_model == "tiny-llama"
        assert version.tags["dataset"] == "toy"
    return registry


def test_run_records_params_metrics_and_status(populated: Registry) -> None:
    version = populated.resolve_version(f"{NAME}/2")
    run = populated.client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.001", "r": "2"}
    assert run.data.metrics == {"loss": 0.5, "acc": 0.5}  # the last value of each metric
    assert run.data.tags["purpose"] == "test" and run.data.tags["adapterhub.method"] == "lora"
    history = populated.client.get_metric_history(version.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    # Local store: artifacts live under <data_dir>/artifacts, not in the working directory.
    assert run.info.artifact_uri.startswith((populated.data_dir / "artifacts").as_uri())


@pytest.mark.parametrize(
    ("ref", "fill"),
    [
        (NAME, 2.0),
        (f"{NAME}@prod", 1.0),
        (f"{NAME}@staging", 2.0),
        (f"{NAME}/1", 1.0),
        (f"{NAME}/latest", 2.0),
        (f"models:/{NAME}/1", 1.0),
        (f"models:/{NAME}@prod", 1.0),
    ],
)
def test_resolve_registry_refs(populated: Registry, ref: str, fill: float) -> None:
    path = populated.resolve(ref)
    assert (path / "adapter_config.json").is_file()
    assert fill_of(path) == fill


def test_resolve_local_path(populated: Registry, tmp_path: Path) -> None:
    adapter = write_fake_adapter(tmp_path / "local", 7.0)
    assert populated.resolve(adapter) == adapter.resolve()
    assert populated.resolve(str(adapter)) == adapter.resolve()


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("nope", "adapter 'nope' not found: no adapter named 'nope'"),
        (f"{NAME}/9", f"adapter '{NAME}/9' not found: '{NAME}' has no version 9 (latest is 2)"),
        (f"{NAME}@gone", f"adapter '{NAME}@gone' not found: '{NAME}' has no alias 'gone' "
                         "(aliases: prod, staging)"),
        ("models:/nope@prod", "adapter 'nope@prod' not found"),
        ("bad name", "malformed adapter reference"),
        ("./missing/dir", "neither an adapter directory"),
    ],
)
def test_resolve_errors(populated: Registry, ref: str, message: str) -> None:
    with pytest.raises(RegistryError) as info:
        populated.resolve(ref)
    assert message in str(info.value)


def test_resolve_directory_without_config(populated: Registry, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="neither an adapter directory"):
        populated.resolve(tmp_path / "empty")


def test_list_and_get(populated: Registry) -> None:
    [summary] = [s for s in populated.list_adapters() if s.name == NAME]
    assert summary.latest_version == 2
    assert summary.aliases == {"prod": 1, "staging": 2}
    assert summary.method == "lora" and summary.base_model == "tiny-llama"
    assert summary.created is not None and summary.versions == []
    detail = populated.get_adapter(NAME)
    assert [v.version for v in detail.versions] == [2, 1]
    assert [v.aliases for v in detail.versions] == [["staging"], ["prod"]]
    assert all(v.method == "lora" and v.run_id for v in detail.versions)
    with pytest.raises(RegistryError, match="adapter 'nope' not found"):
        populated.get_adapter("nope")


def test_set_alias_moves_and_validates(populated: Registry) -> None:
    try:
        _check_set_alias(populated)
    finally:
        # Other tests read the alias list of the shared registry.
        populated.client.delete_registered_model_alias(NAME, "canary")


def _check_set_alias(populated: Registry) -> None:
    populated.set_alias(NAME, "canary", 1)
    assert populated.resolve_version(f"{NAME}@canary").version == 1
    populated.set_alias(NAME, "canary", "2")
    assert populated.resolve_version(f"{NAME}@canary").version == 2
    with pytest.raises(RegistryError, match="has no version 5"):
        populated.set_alias(NAME, "canary", 5)
    with pytest.raises(RegistryError, match="invalid alias"):
        populated.set_alias(NAME, "latest", 1)
    with pytest.raises(RegistryError, match="adapter 'nope/1' not found"):
        populated.set_alias("nope", "x", 1)


def test_failed_run_and_registration_errors(populated: Registry, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="boom"):
        with populated.start_run("sft", run_name="broken") as run:
            run.log_metrics({"loss": 3.0})
            raise ValueError("boom")
    assert run.status == "FAILED"
    assert populated.client.get_run(run.run_id).info.status == "FAILED"

    with populated.start_run("sft") as run:
        with pytest.raises(RegistryError, match="log_adapter must be called"):
            run.register_adapter("x")
        with pytest.raises(AdapterError, match="no adapter_config.json"):
            (tmp_path / "bare").mkdir()
            run.log_adapter(tmp_path / "bare")
        run.log_adapter(write_fake_adapter(tmp_path / "a", 3.0, method="mos"))
        for bad in ("bad/name", "", "a b", "..", "x" * 200):
            with pytest.raises(RegistryError, match="invalid adapter name"):
                run.register_adapter(bad)
        with pytest.raises(RegistryError, match="metric 'loss' is not a number"):
            run.log_metrics({"loss": "high"})
        run.log_params({"lr": 1})
        with pytest.raises(RegistryError, match="cannot log params"):
            run.log_params({"lr": 2})  # MLflow params are write-once
        version = run.register_adapter("other", aliases="prod")  # a lone string is one alias
    assert (version.version, version.aliases, version.method) == (1, ["prod"], "mos")
    assert populated.client.get_run(run.run_id).info.status == "FINISHED"


def test_registries_coexist(populated: Registry, tmp_path: Path) -> None:
    other = Registry(data_dir=tmp_path / "other")
    assert other.list_adapters() == []
    with pytest.raises(RegistryError, match=f"adapter '{NAME}' not found"):
        other.resolve(NAME)
    assert populated.resolve_version(NAME).version == 2


def test_interrupted_run_is_killed_then_resumed(populated: Registry) -> None:
    with pytest.raises(KeyboardInterrupt):
        with populated.start_run("sft", run_name="interrupted") as run:
            run.log_metrics({"loss": 1.0}, step=1)
            raise KeyboardInterrupt
    assert populated.client.get_run(run.run_id).info.status == "KILLED"
    with populated.resume_run(run.run_id) as resumed:
        assert populated.client.get_run(run.run_id).info.status == "RUNNING"
        resumed.log_metrics({"loss": 0.5}, step=2)
    info = populated.client.get_run(run.run_id)
    assert info.info.status == "FINISHED" and info.data.metrics["loss"] == 0.5
    with pytest.raises(RegistryError, match="run '0123' not found"):
        populated.resume_run("0123")


def test_unreachable_server_fails_fast(tmp_path: Path) -> None:
    from adapterhub.registry.server import free_port

    with pytest.raises(RegistryError, match="cannot reach the tracking server"):
        Registry(data_dir=tmp_path, tracking_uri=f"http://127.0.0.1:{free_port()}")
