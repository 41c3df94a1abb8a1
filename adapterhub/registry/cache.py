"""Turning a registered version's artifact URI into a local adapter directory."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow.artifacts

from adapterhub.errors import RegistryError
from adapterhub.registry._mlflow import translated
from adapterhub.registry.models import CONFIG_FILE, AdapterVersion


def is_adapter_dir(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_FILE).is_file()


def local_source(source: str) -> Path | None:
    """The filesystem path behind a file:// (or bare path) source, else None."""
    parsed = urlparse(source)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and source.startswith("/"):
        return Path(source)
    return None


def materialize(version: AdapterVersion, cache_root: Path, tracking_uri: str) -> Path:
    """A local directory holding `version`'s adapter: its own store path or a cached download."""
    local = local_source(version.source)
    if local is not None and is_adapter_dir(local):
        return local
    dest = cache_root / version.name / str(version.version)
    # Versions are immutable, so a complete cached copy never goes stale.
    if is_adapter_dir(dest):
        return dest
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)  # leftover without a config: not a usable copy
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename, so readers never see a half-written cache entry.
    staging = dest.parent / f".{version.version}.{uuid.uuid4().hex}.partial"
    try:
        with translated(f"cannot download adapter {version.ref} from {version.source}"):
            fetched = Path(
                mlflow.artifacts.download_artifacts(
                    artifact_uri=version.source,
                    dst_path=str(staging),
                    tracking_uri=tracking_uri,
                    registry_uri=tracking_uri,
                )
            )
        if not is_adapter_dir(fetched):
            raise RegistryError(
                f"adapter {version.ref} at {version.source} holds no {CONFIG_FILE}"
            )
        try:
            os.replace(fetched, dest)
        except OSError:
            # Another process finished the same download first; its copy is as good as ours.
            if not is_adapter_dir(dest):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
