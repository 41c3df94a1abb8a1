"""Where a job trains: co-served inside a serving engine's iterations, or on a dedicated worker.

The job service does not know engines (adapterhub depends on nothing in serving): a server
that co-serves hands the manager a ``Coserving`` object, which says whether a job can run
inside its engine and gives run_finetune the backend that does it. ``auto`` (the default)
co-serves whenever that is possible and falls back to the dedicated worker otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from adapterhub.finetune import FinetuneBackend, FinetuneJob
from adapterhub.jobs.errors import PlacementUnavailableError

CO_SERVE, DEDICATED = "co_serve", "dedicated"


class Coserving(Protocol):
    def unavailable(self, spec: FinetuneJob) -> str | None:
        """Why ``spec`` cannot be co-served here, or None."""

    def backend(self, spec: FinetuneJob,
                interrupt: Callable[[], BaseException | None]) -> FinetuneBackend:
        """The run_finetune backend that trains ``spec`` inside the engine. Between steps,
        which can be far apart under load, it raises what ``interrupt()`` returns (the job
        was cancelled, or the service stops)."""


def resolve_placement(spec: FinetuneJob, coserving: Coserving | None) -> str:
    """CO_SERVE or DEDICATED for a validated spec; PlacementUnavailableError if it asked for
    co-serving (or for serving its checkpoints) where that cannot be done."""
    why = "this server does not co-serve fine-tuning" if coserving is None \
        else coserving.unavailable(spec)
    if spec.placement == DEDICATED:
        placement = DEDICATED
    elif why is None:
        placement = CO_SERVE
    elif spec.placement == CO_SERVE:
        raise PlacementUnavailableError(f"job {spec.name!r} cannot be co-served: {why}")
    else:
        placement = DEDICATED
    if placement == DEDICATED and spec.serve_checkpoints_as:
        raise PlacementUnavailableError(
            "serving checkpoints while training needs a co-served job"
            + ("" if spec.placement == DEDICATED else f" ({why})"))
    return placement
