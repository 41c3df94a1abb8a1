"""RunLogger: one MLflow run, used as a context manager, that can log and register an adapter."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag

from adapterhub.errors import AdapterError, RegistryError
from adapterhub.registry._mlflow import translated
from adapterhub.registry.models import AdapterVersion, adapter_metadata

if TYPE_CHECKING:
    from adapterhub.registry.store import Registry

ADAPTER_ARTIFACT_PATH = "adapter"
# MLflow's per-request limits for log_batch.
_MAX_PARAMS = 100
_MAX_METRICS = 1000


class RunLogger:
    """Logs to one run; leaving the `with` block ends it FINISHED, FAILED on error, KILLED on ^C."""

    def __init__(self, registry: Registry, run_id: str, artifact_uri: str) -> None:
        self._registry = registry
        self._client = registry.client
        self.run_id = run_id
        self.artifact_uri = artifact_uri
        self.adapter_uri: str | None = None
        self._adapter_tags: dict[str, str] = {}
        self._status: str | None = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"  # mirrors mlflow.start_run: an interrupted run did not fail
        else:
            status = "FAILED"
        try:
            self.end(status)
        except RegistryError:
            if exc_type is None:
                raise
            # Never mask the user's original exception with a bookkeeping one.

    @property
    def status(self) -> str | None:
        """The final status once ended, else None."""
        return self._status

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated; later calls are no-ops."""
        if self._status is not None:
            return
        with translated(f"cannot end run {self.run_id}"):
            self._client.set_terminated(self.run_id, status=status)
        self._status = status

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (values stringified; re-logging a key with a new value is an error)."""
        entries = [Param(str(k), str(v)) for k, v in params.items()]
        for chunk in _chunks(entries, _MAX_PARAMS):
            with translated(f"cannot log params to run {self.run_id}"):
                self._client.log_batch(self.run_id, params=chunk)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics at `step` (0 when omitted, as MLflow does)."""
        now = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise RegistryError(f"metric {key!r} is not a number: {value!r}") from None
            entries.append(Metric(str(key), number, now, int(step or 0)))
        for chunk in _chunks(entries, _MAX_METRICS):
            with translated(f"cannot log metrics to run {self.run_id}"):
                self._client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified)."""
        entries = [RunTag(str(k), str(v)) for k, v in tags.items()]
        for chunk in _chunks(entries, _MAX_PARAMS):
            with translated(f"cannot tag run {self.run_id}"):
                self._client.log_batch(self.run_id, tags=chunk)

    def log_adapter(self, adapter_dir: str | Path) -> str:
        """Upload an adapter directory as the run's "adapter" artifacts; return their URI."""
        adapter_dir = Path(adapter_dir)
        if not adapter_dir.is_dir():
            raise AdapterError(f"adapter directory not found: {adapter_dir}")
        metadata = adapter_metadata(adapter_dir)
        with translated(f"cannot log adapter {adapter_dir}"):
            self._client.log_artifacts(self.run_id, str(adapter_dir), ADAPTER_ARTIFACT_PATH)
        if metadata:
            # Also on the run, so the runs table in the UI shows what was trained.
            self.set_tags({f"adapterhub.{k}": v for k, v in metadata.items()})
        self._adapter_tags = metadata
        self.adapter_uri = f"{self.artifact_uri.rstrip('/')}/{ADAPTER_ARTIFACT_PATH}"
        return self.adapter_uri

    def register_adapter(
        self,
        name: str,
        aliases: Iterable[str] = (),
        tags: Mapping[str, Any] | None = None,
    ) -> AdapterVersion:
        """Register the logged adapter as the next version of `name` (created if new)."""
        if self.adapter_uri is None:
            raise RegistryError("log_adapter must be called before register_adapter")
        if isinstance(aliases, str):
            aliases = [aliases]  # a lone alias, not its characters
        merged = {**self._adapter_tags, **{str(k): str(v) for k, v in (tags or {}).items()}}
        return self._registry.register_version(
            name, source=self.adapter_uri, run_id=self.run_id, aliases=list(aliases), tags=merged
        )


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
