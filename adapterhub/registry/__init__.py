"""Adapter registry and run tracking over MLflow (SQLite by default), plus its web UI.

MLflow takes seconds to import, so the MLflow-backed classes load on first use; reference
parsing and the UI launcher stay cheap to import.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from adapterhub.registry.models import AdapterSummary, AdapterVersion
from adapterhub.registry.refs import AdapterRef, parse_ref, validate_alias, validate_name

if TYPE_CHECKING:
    from adapterhub.registry.runs import RunLogger
    from adapterhub.registry.store import Registry

_LAZY = {
    "Registry": "adapterhub.registry.store",
    "RunLogger": "adapterhub.registry.runs",
}

__all__ = [
    "AdapterRef",
    "AdapterSummary",
    "AdapterVersion",
    "Registry",
    "RunLogger",
    "parse_ref",
    "validate_alias",
    "validate_name",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
