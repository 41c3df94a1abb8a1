"""Registry: experiments, runs and registered adapters over one MLflow tracking store."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from adapterhub import settings
from adapterhub.errors import RegistryError
from adapterhub.registry._mlflow import (
    ALREADY_EXISTS,
    NOT_FOUND,
    check_reachable,
    error_code,
    is_remote,
    make_client,
    translated,
)
from adapterhub.registry.cache import is_adapter_dir, materialize
from adapterhub.registry.models import (
    AdapterSummary,
    AdapterVersion,
    aliases_by_version,
    from_ms,
    version_from_mlflow,
)
from adapterhub.registry.refs import (
    AdapterRef,
    looks_like_path,
    parse_ref,
    parse_version,
    validate_alias,
    validate_name,
)
from adapterhub.registry.runs import RunLogger

_PAGE = 1000


class Registry:
    """Tracking and model registry bound to one store; several may coexist in a process."""

    def __init__(self, data_dir: str | Path | None = None, tracking_uri: str | None = None):
        self.data_dir: Path = settings.data_dir(data_dir)
        self.tracking_uri: str = tracking_uri or settings.tracking_uri(self.data_dir)
        if urlparse(self.tracking_uri).scheme in ("http", "https"):
            check_reachable(self.tracking_uri)
        self.client = make_client(self.tracking_uri)
        self._experiments: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Registry(tracking_uri={self.tracking_uri!r})"

    # ---- runs -------------------------------------------------------------------------

    def start_run(
        self,
        experiment: str,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> RunLogger:
        """Create a run in `experiment` (created if new); use the result as a context manager."""
        experiment_id = self._experiment_id(experiment)
        run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
        with translated(f"cannot start a run in experiment {experiment!r}"):
            run = self.client.create_run(experiment_id, run_name=run_name, tags=run_tags)
        logger = RunLogger(self, run.info.run_id, run.info.artifact_uri)
        if params:
            try:
                logger.log_params(params)
            except RegistryError:
                logger.end("FAILED")
                raise
        return logger

    def resume_run(self, run_id: str) -> RunLogger:
        """Reopen an existing run (e.g. after an interrupted job) and mark it RUNNING again."""
        try:
            with translated(f"cannot resume run {run_id}"):
                run = self.client.get_run(run_id)
        except RegistryError as exc:
            if error_code(exc.__cause__) == NOT_FOUND:
                raise RegistryError(f"run {run_id!r} not found in {self.tracking_uri}") from None
            raise
        if run.info.status != "RUNNING":
            with translated(f"cannot resume run {run_id}"):
                self.client.update_run(run_id, status="RUNNING")
        return RunLogger(self, run_id, run.info.artifact_uri)

    def _experiment_id(self, name: str) -> str:
        if not name or not str(name).strip():
            raise RegistryError("experiment name must not be empty")
        if name in self._experiments:
            return self._experiments[name]
        with translated(f"cannot open experiment {name!r}"):
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                exp_id = self._create_experiment(name)
            else:
                exp_id = exp.experiment_id
                if exp.lifecycle_stage == "deleted":
                    # A deleted experiment still owns its name; logging into it would fail.
                    self.client.restore_experiment(exp_id)
        self._experiments[name] = exp_id
        return exp_id

    def _create_experiment(self, name: str) -> str:
        # A tracking server picks (and proxies) artifact storage itself; a local database
        # would otherwise default to ./mlruns in whatever the working directory is.
        location = None
        if not is_remote(self.tracking_uri):
            location = settings.artifacts_dir(self.data_dir).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception as exc:
            if error_code(exc) != ALREADY_EXISTS:
                raise
            return self.client.get_experiment_by_name(name).experiment_id  # lost a race

    # ---- registering ------------------------------------------------------------------

    def register_version(
        self,
        name: str,
        source: str,
        run_id: str | None = None,
        aliases: Iterable[str] = (),
        tags: Mapping[str, str] | None = None,
    ) -> AdapterVersion:
        """Register `source` (an artifact URI of an adapter directory) as a new version."""
        validate_name(name)
        aliases = [validate_alias(a) for a in aliases]  # before anything is written
        with translated(f"cannot register adapter {name!r}"):
            try:
                self.client.create_registered_model(name)
            except Exception as exc:
                if error_code(exc) != ALREADY_EXISTS:
                    raise
            mv = self.client.create_model_version(
                name, source=source, run_id=run_id, tags=dict(tags or {})
            )
            for alias in aliases:
                self.client.set_registered_model_alias(name, alias, str(mv.version))
        return version_from_mlflow(mv, aliases=aliases)

    def set_alias(self, name: str, alias: str, version: int | str) -> None:
        """Point `name@alias` at `version` (moving it if it pointed elsewhere)."""
        ref = AdapterRef(validate_name(name), version=parse_version(version))
        validate_alias(alias)
        self._get_version(ref, self._get_model(ref))  # precise error for unknown name/version
        with translated(f"cannot set alias {alias!r} on adapter {name!r}"):
            self.client.set_registered_model_alias(name, alias, str(ref.version))

    # ---- reading ----------------------------------------------------------------------

    def list_adapters(self) -> list[AdapterSummary]:
        """Every registered adapter, by name."""
        models, token = [], None
        with translated("cannot list adapters"):
            while True:
                page = self.client.search_registered_models(
                    max_results=_PAGE, order_by=["name ASC"], page_token=token
                )
                models.extend(page)
                token = page.token
                if not token:
                    break
        return [self._summary(rm) for rm in models]

    def get_adapter(self, name: str) -> AdapterSummary:
        """One adapter with all of its versions, newest first."""
        ref = AdapterRef(validate_name(name))
        rm = self._get_model(ref)
        summary = self._summary(rm)
        by_version = aliases_by_version(rm.aliases)
        versions, token = [], None
        with translated(f"cannot list versions of adapter {name!r}"):
            while True:
                page = self.client.search_model_versions(
                    f"name = '{name}'", max_results=_PAGE, page_token=token
                )
                versions.extend(page)
                token = page.token
                if not token:
                    break
        summary.versions = sorted(
            (version_from_mlflow(mv, by_version.get(int(mv.version), [])) for mv in versions),
            key=lambda v: v.version,
            reverse=True,
        )
        return summary

    def resolve_version(self, ref: str | AdapterRef) -> AdapterVersion:
        """The registered version a registry reference names (latest when it names none)."""
        parsed = ref if isinstance(ref, AdapterRef) else parse_ref(ref)
        return self._get_version(parsed, self._get_model(parsed))

    def resolve(self, ref: str | Path) -> Path:
        """A local adapter directory for a path or any registry reference."""
        text = str(ref)
        path = Path(text).expanduser()
        if is_adapter_dir(path):
            return path.resolve()
        try:
            parsed = parse_ref(text)
        except RegistryError as exc:
            if isinstance(ref, Path) or path.exists() or looks_like_path(text):
                raise RegistryError(
                    f"{text!r} is neither an adapter directory (a folder holding "
                    f"adapter_config.json) nor a registry reference ({exc})"
                ) from None
            raise
        version = self.resolve_version(parsed)
        return materialize(version, settings.cache_dir(self.data_dir), self.tracking_uri)

    # ---- helpers ----------------------------------------------------------------------

    def _get_model(self, ref: AdapterRef) -> Any:
        try:
            with translated(f"cannot look up adapter {ref.name!r}"):
                return self.client.get_registered_model(ref.name)
        except RegistryError as exc:
            if error_code(exc.__cause__) == NOT_FOUND:
                raise RegistryError(
                    f"adapter '{ref}' not found: no adapter named {ref.name!r} is registered "
                    f"in {self.tracking_uri}"
                ) from None
            raise

    def _get_version(self, ref: AdapterRef, rm: Any) -> AdapterVersion:
        alias_map = {a: int(v) for a, v in (rm.aliases or {}).items()}
        if ref.alias is not None:
            if ref.alias not in alias_map:
                known = ", ".join(sorted(alias_map)) or "none"
                raise RegistryError(
                    f"adapter '{ref}' not found: {ref.name!r} has no alias {ref.alias!r} "
                    f"(aliases: {known})"
                )
            number = alias_map[ref.alias]
        elif ref.version is not None:
            number = ref.version
        else:
            latest = _latest_number(rm)
            if latest is None:
                raise RegistryError(f"adapter '{ref}' not found: {ref.name!r} has no versions")
            number = latest
        try:
            with translated(f"cannot look up adapter {ref}"):
                mv = self.client.get_model_version(ref.name, str(number))
        except RegistryError as exc:
            if error_code(exc.__cause__) == NOT_FOUND:
                latest = _latest_number(rm)
                hint = f"latest is {latest}" if latest is not None else "it has no versions"
                raise RegistryError(
                    f"adapter '{ref}' not found: {ref.name!r} has no version {number} ({hint})"
                ) from None
            raise
        return version_from_mlflow(mv, aliases_by_version(alias_map).get(number, []))

    def _summary(self, rm: Any) -> AdapterSummary:
        latest = max(rm.latest_versions or [], key=lambda mv: int(mv.version), default=None)
        newest = version_from_mlflow(latest) if latest is not None else None
        return AdapterSummary(
            name=rm.name,
            latest_version=newest.version if newest else None,
            aliases={a: int(v) for a, v in (rm.aliases or {}).items()},
            method=newest.method if newest else None,
            base_model=newest.base_model if newest else None,
            created=from_ms(rm.creation_timestamp),
            description=rm.description or None,
        )


def _latest_number(rm: Any) -> int | None:
    # latest_versions holds the newest version per stage; adapters never use stages, and
    # even if someone does in the UI the overall newest is the largest of them.
    numbers = [int(mv.version) for mv in (rm.latest_versions or [])]
    return max(numbers) if numbers else None
