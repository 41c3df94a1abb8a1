"""FineTuneService: submit, get, list, cancel and watch jobs of a JobManager.

The manager (adapterhub.jobs) persists and runs jobs; this layer only validates and
converts. Watch streams do not hold up a graceful shutdown: they end when draining starts
(or when the client leaves), at the manager's next stop check.
"""

from __future__ import annotations

from typing import Any

import grpc

from adapterhub.v1 import finetune_pb2, finetune_pb2_grpc
from serving.api.calls import CallTracker, stream, unary
from serving.api.job_proto import STATE_NAMES, job_to_proto, spec_from_proto
from serving.api.status import ApiError


def _state_values(names: list[str]) -> list[Any]:
    # The manager's states are a str Enum; hand it its own type when it is importable.
    try:
        from adapterhub.jobs.models import JobState
    except ImportError:
        return names
    return [JobState(n) for n in names]


class FineTuneServicer(finetune_pb2_grpc.FineTuneServiceServicer):
    def __init__(self, jobs: Any, calls: CallTracker, base_model: str | None = None) -> None:
        self.jobs = jobs
        self.calls = calls
        self.base_model = base_model

    def _manager(self) -> Any:
        if self.jobs is None:
            raise ApiError(grpc.StatusCode.UNIMPLEMENTED, "fine-tuning is not enabled here")
        return self.jobs

    def _get(self, job_id: str) -> Any:
        if not job_id:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, "job id is empty")
        try:
            return self._manager().get(job_id)
        except KeyError:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"no job with id {job_id!r}") from None

    @unary("FineTuneService/Submit")
    def Submit(self, request, context, info):
        spec, train, evals = spec_from_proto(request.spec, self.base_model)
        info["adapter"] = spec.name
        try:
            job = self._manager().submit(spec, train, evals)
        except (ValueError, TypeError) as exc:
            raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        info["job"] = job.id
        return job_to_proto(job)

    @unary("FineTuneService/Get")
    def Get(self, request, context, info):
        info["job"] = request.id
        return job_to_proto(self._get(request.id))

    @unary("FineTuneService/List")
    def List(self, request, context, info):
        names = []
        for s in request.states:
            if s not in STATE_NAMES:
                raise ApiError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown job state {s}")
            names.append(STATE_NAMES[s])
        jobs = self._manager().list(states=_state_values(names) if names else None)
        return finetune_pb2.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs])

    @unary("FineTuneService/Cancel")
    def Cancel(self, request, context, info):
        info["job"] = request.id
        self._get(request.id)
        try:
            return job_to_proto(self._manager().cancel(request.id))
        except KeyError:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"no job with id {request.id!r}") from None
        except ValueError as exc:
            raise ApiError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None

    @stream("FineTuneService/Watch", tracked=False)
    def Watch(self, request, context, info):
        info["job"] = request.id
        self._get(request.id)  # unknown ids fail before the stream starts

        def should_stop() -> bool:  # the manager asks about once a second
            return not context.is_active() or self.calls.draining.is_set()

        try:
            updates = self._manager().watch(request.id, should_stop=should_stop)
        except KeyError:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"no job with id {request.id!r}") from None
        for job in updates:
            yield job_to_proto(job)
