"""The job runtime shared by every cryostack service: job kinds, the runner, the gRPC server factory, the client.

A stage registers a `JobKind` (request type, validation, job function) with the `JobRunner` and adds a thin
servicer whose Submit RPC calls `runner.submit`; `create_server` adds the job API, health and reflection::

    KIND = JobKind(
        name="classify2d",
        service="classify2d",
        request_type=classify2d_pb2.SubmitClassify2DRequest,
        validate=algorithm.validate_request,  # raises InvalidArgumentError before anything is written
        run=algorithm.run_job,  # (JobContext, request) -> Classify2DResult
    )

    class Classify2DServicer(classify2d_pb2_grpc.Classify2DServiceServicer):
        def __init__(self, runner: JobRunner) -> None:
            self._runner = runner

        def SubmitClassify2D(self, request, context):
            return self._runner.submit(KIND.name, request)

    def register(server: grpc.Server, runner: JobRunner) -> list[str]:
        runner.register(KIND)
        classify2d_pb2_grpc.add_Classify2DServiceServicer_to_server(Classify2DServicer(runner), server)
        return [classify2d_pb2.DESCRIPTOR.services_by_name["Classify2DService"].full_name]

`cryostack serve classify2d` finds `register` in `cryostack.services.classify2d.servicer`.
"""

from cryostack.runtime.context import JobContext
from cryostack.runtime.kinds import JobKind
from cryostack.runtime.runner import JobRunner
from cryostack.runtime.server import CryostackServer, Registrar, create_server, run_until_signalled, serve
from cryostack.runtime.store import JobStore

__all__ = [
    "CryostackServer",
    "JobContext",
    "JobKind",
    "JobRunner",
    "JobStore",
    "Registrar",
    "create_server",
    "run_until_signalled",
    "serve",
]
