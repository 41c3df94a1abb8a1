"""Plain records the registry returns, decoupled from MLflow's entity classes."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from adapterhub.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
# Model-version tag keys; plain names so they read well in the MLflow UI.
METHOD_TAG = "method"
BASE_MODEL_TAG = "base_model"


@dataclass
class AdapterVersion:
    """One registered version of an adapter."""

    name: str
    version: int
    run_id: str | None
    source: str
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    method: str | None = None
    base_model: str | None = None
    created: datetime | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass
class AdapterSummary:
    """A registered adapter; `versions` is filled by Registry.get_adapter only (newest first)."""

    name: str
    latest_version: int | None
    aliases: dict[str, int] = field(default_factory=dict)
    method: str | None = None
    base_model: str | None = None
    created: datetime | None = None
    description: str | None = None
    versions: list[AdapterVersion] = field(default_factory=list)


def from_ms(ms: int | None) -> datetime | None:
    """MLflow's epoch milliseconds as an aware UTC datetime."""
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def version_from_mlflow(mv: Any, aliases: list[str] | None = None) -> AdapterVersion:
    """Convert an MLflow ModelVersion; `aliases` overrides its own list (search omits them)."""
    tags = dict(mv.tags or {})
    return AdapterVersion(
        name=mv.name,
        version=int(mv.version),
        run_id=mv.run_id or None,
        source=mv.source,
        aliases=sorted(aliases if aliases is not None else (mv.aliases or [])),
        tags=tags,
        method=tags.get(METHOD_TAG),
        base_model=tags.get(BASE_MODEL_TAG),
        created=from_ms(mv.creation_timestamp),
    )


def aliases_by_version(alias_map: dict[str, Any]) -> dict[int, list[str]]:
    """Invert a registered model's {alias: version} map."""
    out: dict[int, list[str]] = {}
    for alias, version in (alias_map or {}).items():
        out.setdefault(int(version), []).append(alias)
    return out


def adapter_metadata(adapter_dir: Path) -> dict[str, str]:
    """Method and base model read from an adapter directory's config, as version tags."""
    config_path = Path(adapter_dir) / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"not an adapter directory (no {CONFIG_FILE}): {adapter_dir}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"unreadable {config_path}: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path} must hold a JSON object")
    tags: dict[str, str] = {}
    # Plain PEFT adapters carry no adapterhub_method; their peft_type ("LORA") still says it.
    method = config.get("adapterhub_method") or config.get("peft_type")
    if method:
        tags[METHOD_TAG] = str(method).lower()
    if config.get("base_model_name_or_path"):
        tags[BASE_MODEL_TAG] = str(config["base_model_name_or_path"])
    return tags
