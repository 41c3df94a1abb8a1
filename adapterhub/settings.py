"""Where AdapterHub keeps its data, which tracking store it talks to, and its offline defaults."""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "ADAPTERHUB_HOME"
TRACKING_ENV = "ADAPTERHUB_TRACKING_URI"


def data_dir(explicit: str | Path | None = None) -> Path:
    """The data directory: explicit flag > $ADAPTERHUB_HOME > ~/.adapterhub (created on demand)."""
    if explicit is not None and str(explicit) != "":
        path = Path(explicit)
    elif os.environ.get(HOME_ENV):
        path = Path(os.environ[HOME_ENV])
    else:
        path = Path.home() / ".adapterhub"
    # Absolute so that URIs built from it stay valid whatever the working directory becomes.
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_tracking_uri(data_dir: Path) -> str:
    """The SQLite store inside the data directory (MLflow's file store is refused here)."""
    return f"sqlite:///{Path(data_dir).resolve() / 'mlflow.db'}"


def tracking_uri(data_dir: Path) -> str:
    """$ADAPTERHUB_TRACKING_URI, else $MLFLOW_TRACKING_URI, else the data directory's SQLite."""
    for var in (TRACKING_ENV, "MLFLOW_TRACKING_URI"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    return default_tracking_uri(data_dir)


def artifacts_dir(data_dir: Path) -> Path:
    """Where run artifacts (logged adapters) live when the store is local."""
    return Path(data_dir) / "artifacts"


def cache_dir(data_dir: Path) -> Path:
    """Where registry adapters are materialised as local directories."""
    return Path(data_dir) / "cache"


def offline_env(data_dir_path: str | Path | None = None) -> None:
    """Default every tool to offline, quiet and inside the data directory (user values win)."""
    defaults = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Without this `mlflow server` spawns job workers that outlive it.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "TOKENIZERS_PARALLELISM": "false",
        # Our own progress bars are the ones a user reads; library bars are noise on stderr.
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # Only resolve (and create) the data directory when a cache location is actually missing.
    missing = [var for var in ("HF_HOME", "FLWR_HOME") if not os.environ.get(var)]
    if missing:
        root = data_dir(data_dir_path)
        for var in missing:
            os.environ[var] = str(root / var.removesuffix("_HOME").lower())
