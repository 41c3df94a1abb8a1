"""One place that turns an exception into a gRPC status code and a message for the client.

Errors caused by the request get their precise code and their own one-line message;
anything else is a server fault: INTERNAL with a generic message (details go to the log).
"""

from __future__ import annotations

import grpc

from adapterhub.errors import (
    AdapterError,
    AdapterHubError,
    CheckpointError,
    DatasetError,
    IncompatibleAdapterError,
    RegistryError,
)
from serving.engine.errors import AdapterNotFound, InvalidRequest, Overloaded


class ApiError(Exception):
    """Raised by servicer code that already knows the status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _job_errors() -> tuple[type, type, type, type]:
    # adapterhub.jobs is optional here (it may be absent); the fallbacks match nothing new.
    try:
        from adapterhub.jobs.errors import (
            DatasetNotAllowedError,
            JobFinalError,
            JobNotFoundError,
            PlacementUnavailableError,
        )
    except ImportError:
        return _Never, _Never, _Never, _Never
    return DatasetNotAllowedError, JobFinalError, JobNotFoundError, PlacementUnavailableError


class _Never(Exception):
    pass


def registry_status(exc: RegistryError) -> grpc.StatusCode:
    # RegistryError has no subclasses; its messages are stable and say which case it is.
    text = str(exc)
    if text.startswith(("malformed", "invalid")):
        return grpc.StatusCode.INVALID_ARGUMENT
    if "not found" in text or "neither an adapter directory" in text:
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.UNAVAILABLE


def classify(exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
    """The status for a client-caused error, or None for a server fault."""
    not_allowed, final, job_missing, placement = _job_errors()
    S = grpc.StatusCode
    if isinstance(exc, ApiError):
        return exc.code, exc.message
    if isinstance(exc, not_allowed):
        return S.PERMISSION_DENIED, str(exc)
    if isinstance(exc, (final, placement)):
        return S.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, (job_missing, AdapterNotFound)):
        return S.NOT_FOUND, str(exc)
    if isinstance(exc, InvalidRequest):
        return S.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, Overloaded):
        return S.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, IncompatibleAdapterError):
        return S.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, RegistryError):
        return registry_status(exc), str(exc)
    if isinstance(exc, (AdapterError, DatasetError, CheckpointError, AdapterHubError)):
        return S.INVALID_ARGUMENT, str(exc)
    return None
