"""Errors of the job service, typed so that an RPC layer can map each to a status code."""

from __future__ import annotations

from adapterhub.errors import DatasetError


class JobNotFoundError(KeyError):
    """No job has that id (a KeyError whose text is the plain message, without quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "job not found"


class JobFinalError(ValueError):
    """The job already reached a final state, so it cannot be cancelled."""


class DatasetNotAllowedError(DatasetError):
    """A dataset path lies outside the directories this service may read."""


class StoreInUseError(RuntimeError):
    """Another JobManager already runs the same job store."""


class PlacementUnavailableError(RuntimeError):
    """The job asked to be co-served (or to serve its checkpoints) where that cannot be done."""
