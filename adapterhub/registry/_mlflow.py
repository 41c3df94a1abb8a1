"""The one place that imports MLflow: client construction and error translation."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

# No network here; MLflow reads this lazily, so setting it before the first client is enough.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from adapterhub.errors import RegistryError  # noqa: E402

NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
ALREADY_EXISTS = "RESOURCE_ALREADY_EXISTS"


def make_client(tracking_uri: str) -> MlflowClient:
    """A client bound to `tracking_uri` for both tracking and registry (no global mlflow state)."""
    # The first open of a fresh SQLite store logs schema migrations at INFO on every command.
    for name in ("mlflow.store.db.utils", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def is_remote(tracking_uri: str) -> bool:
    """True for a tracking server, which chooses artifact locations itself."""
    scheme = urlparse(tracking_uri).scheme.lower()
    return scheme in ("http", "https") or scheme.startswith("databricks")


def check_reachable(tracking_uri: str, timeout: float = 5.0) -> None:
    """Fail fast when a tracking server does not answer at all.

    MLflow's own client retries a refused connection with backoff for about four minutes
    before giving up; one quick probe turns that into an immediate, clear error.
    """
    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # something answered (auth, prefix, proxy); let MLflow report specifics
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RegistryError(
            f"cannot reach the tracking server at {tracking_uri}: {reason}"
        ) from None


def error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None) if isinstance(exc, MlflowException) else None


@contextmanager
def translated(action: str) -> Iterator[None]:
    """Re-raise MLflow failures as one-line RegistryErrors prefixed with what we were doing."""
    try:
        yield
    except MlflowException as exc:
        message = str(exc.message).strip().splitlines()[0] if exc.message else repr(exc)
        raise RegistryError(f"{action}: {message}") from exc
