"""The gRPC JobService: a thin adapter over `JobRunner` (errors are mapped by the interceptor)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc

from cryostack.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from cryostack.runtime.runner import JobRunner


class JobServiceServicer(jobs_pb2_grpc.JobServiceServicer):
    """Get, watch, cancel and list jobs of any service sharing this replica's job store."""

    def __init__(self, runner: JobRunner) -> None:
        self._runner = runner

    def GetJob(self, request: jobs_pb2.GetJobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:  # noqa: N802
        """The job's current state."""
        return self._runner.get(request.name)

    def WatchJob(  # noqa: N802
        self, request: jobs_pb2.WatchJobRequest, context: grpc.ServicerContext
    ) -> Iterator[jobs_pb2.Job]:
        """The job's current state, then every change until it is done or the client goes away."""
        stop = threading.Event()
        context.add_callback(stop.set)
        yield from self._runner.watch(request.name, stop)

    def CancelJob(self, request: jobs_pb2.CancelJobRequest, context: grpc.ServicerContext) -> jobs_pb2.Job:  # noqa: N802
        """Request cancellation and return the job."""
        return self._runner.cancel(request.name)

    def ListJobs(  # noqa: N802
        self, request: jobs_pb2.ListJobsRequest, context: grpc.ServicerContext
    ) -> jobs_pb2.ListJobsResponse:
        """One page of jobs, newest first."""
        jobs, next_page_token = self._runner.list(
            service=request.service,
            states=list(request.states),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return jobs_pb2.ListJobsResponse(jobs=jobs, next_page_token=next_page_token)
