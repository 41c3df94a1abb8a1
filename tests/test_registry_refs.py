"""Registry reference parsing, names, aliases and the settings that locate the registry."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from adapterhub import settings
from adapterhub.errors import RegistryError
from adapterhub.registry.refs import (
    AdapterRef,
    looks_like_path,
    parse_ref,
    parse_version,
    validate_alias,
    validate_name,
)


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("demo", AdapterRef("demo")),
        ("  demo ", AdapterRef("demo")),
        ("demo@prod", AdapterRef("demo", alias="prod")),
        ("demo/3", AdapterRef("demo", version=3)),
        ("demo/latest", AdapterRef("demo")),
        ("demo@latest", AdapterRef("demo")),
        ("models:/demo/12", AdapterRef("demo", version=12)),
        ("models:/demo@stable-2", AdapterRef("demo", alias="stable-2")),
        ("models:/demo", AdapterRef("demo")),
        ("my.adapter_v-1", AdapterRef("my.adapter_v-1")),
        ("_x@a_b", AdapterRef("_x", alias="a_b")),
    ],
)
def test_parse_valid(ref: str, expected: AdapterRef) -> None:
    assert parse_ref(ref) == expected


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("demo@", "alias after '@' is empty"),
        ("@prod", "name is empty"),
        ("/3", "name is empty"),
        ("demo/0", "not a positive integer"),
        ("demo/-1", "not a positive integer"),
        ("demo/x", "not a positive integer"),
        ("demo/1/2", "not a positive integer"),
        ("demo/", "not a positive integer"),
        ("demo@a@b", "invalid alias"),
        ("demo@a/b", "invalid alias"),
        ("demo@v1", "reserved"),
        ("demo@bad alias", "invalid alias"),
        ("bad name", "invalid adapter name"),
        (".hidden", "invalid adapter name"),
        ("-flag", "invalid adapter name"),
        ("naïve", "invalid adapter name"),
        ("a" * 129, "invalid adapter name"),
        ("models:demo", "expected NAME"),
        ("models://demo/1", "expected NAME"),
        ("models:/", "name is empty"),
        ("models:/demo/Production", "not a positive integer"),
    ],
)
def test_parse_malformed(ref: str, reason: str) -> None:
    with pytest.raises(RegistryError, match="malformed adapter reference") as info:
        parse_ref(ref)
    assert reason in str(info.value)


def test_ref_str_round_trips() -> None:
    for text in ("demo", "demo/4", "demo@prod"):
        assert str(parse_ref(text)) == text


def test_validators() -> None:
    assert validate_name("a.b-c_d") == "a.b-c_d"
    assert validate_alias("prod") == "prod"
    assert parse_version("7") == 7 and parse_version(2) == 2
    for bad in ("", "a/b", "a:b", "..", "a b"):
        with pytest.raises(RegistryError, match="invalid adapter name"):
            validate_name(bad)
    for bad in ("", "latest", "V3", "a.b"):
        with pytest.raises(RegistryError, match="invalid alias"):
            validate_alias(bad)
    for bad in ("0", "x", True, "١"):
        with pytest.raises(RegistryError, match="invalid version"):
            parse_version(bad)


def test_looks_like_path() -> None:
    assert looks_like_path("./out") and looks_like_path("~/a") and looks_like_path("out/adapter")
    assert not looks_like_path("demo") and not looks_like_path("models:/demo/1")


def test_data_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "env"))
    assert settings.data_dir(tmp_path / "flag") == (tmp_path / "flag").resolve()
    assert (tmp_path / "flag").is_dir()
    assert settings.data_dir() == (tmp_path / "env").resolve()
    monkeypatch.delenv("ADAPTERHUB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings.data_dir() == (tmp_path / "home" / ".adapterhub").resolve()


def test_tracking_uri_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ADAPTERHUB_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert settings.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert settings.tracking_uri(tmp_path) == "http://127.0.0.1:1"
    monkeypatch.setenv("ADAPTERHUB_TRACKING_URI", "sqlite:////x.db")
    assert settings.tracking_uri(tmp_path) == "sqlite:////x.db"


def test_offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HOME", "FLWR_HOME", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # a user's choice survives
    settings.offline_env(tmp_path)
    assert os.environ["HF_HOME"] == str(tmp_path.resolve() / "hf")
    assert os.environ["FLWR_HOME"] == str(tmp_path.resolve() / "flwr")
    assert os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
