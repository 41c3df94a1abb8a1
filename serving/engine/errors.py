"""Errors a request can fail with; each maps to one gRPC status code in the API layer."""

from __future__ import annotations

from adapterhub.errors import AdapterError, IncompatibleAdapterError


class InvalidRequest(ValueError):
    """Malformed request: bad sampling values, empty or oversize prompt (INVALID_ARGUMENT)."""


class AdapterNotFound(KeyError):
    """The request names an adapter that is not registered (NOT_FOUND)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "adapter not found"


class Overloaded(RuntimeError):
    """The bounded queue is full (RESOURCE_EXHAUSTED)."""


__all__ = ["AdapterError", "AdapterNotFound", "IncompatibleAdapterError", "InvalidRequest",
           "Overloaded"]
