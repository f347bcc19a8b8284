"""What the stage commands share: reach a stage service (configured, or started in-process), submit one job,
show its progress as it runs, and report how it ended."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from cryostack.jobs.v1 import jobs_pb2
    from cryostack.runtime.client import JobClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_REQUEST = 2


@dataclass(frozen=True)
class StageRun:
    """How one submitted job ended: the exit status for the command, and the final job (None if refused)."""

    exit_status: int
    job: jobs_pb2.Job | None


@contextmanager
def stage_client(service: str) -> Iterator[JobClient]:
    """A client of the stage service at CRYOSTACK_<SERVICE>_ADDRESS, or of one started in-process against the
    configured object store for the duration of the block."""
    from cryostack.config import ObjectStoreSettings, ServiceSettings, StageAddresses  # noqa: PLC0415
    from cryostack.io.objectstore import ObjectStore  # noqa: PLC0415
    from cryostack.io.uri import S3Uri  # noqa: PLC0415
    from cryostack.runtime import JobRunner, JobStore, create_server  # noqa: PLC0415
    from cryostack.runtime.client import JobClient  # noqa: PLC0415
    from cryostack.runtime.registry import load_registrar  # noqa: PLC0415

    address = StageAddresses().address_of(service)
    if address is not None:
        with JobClient(address) as client:
            yield client
        return
    settings = ServiceSettings(port=0)
    with ObjectStore(ObjectStoreSettings()) as objects:
        objects.ensure_bucket(S3Uri.parse(settings.jobs_uri, "jobs_uri").bucket)
        runner = JobRunner(JobStore(objects, settings.jobs_uri), settings)
        server, port = create_server(settings, runner, load_registrar(service))
        server.start()
        try:
            with JobClient(f"{settings.host}:{port}") as client:
                yield client
        finally:
            server.stop(0).wait()


def follow(client: JobClient, job: jobs_pb2.Job, *, stream: TextIO | None = None) -> jobs_pb2.Job:
    """Print the job's progress messages as they arrive (to stderr by default); return the job once it ended."""
    from cryostack.jobs.v1 import jobs_pb2  # noqa: PLC0415

    stream = stream or sys.stderr

    for update in client.watch(job.name):
        job = update
        if update.progress.message:
            print(f"[{jobs_pb2.JobState.Name(update.state)}] {update.progress.message}", file=stream, flush=True)
    return job


def submit_and_follow(
    command: str, client: JobClient, method: str, request: Message, *, stream: TextIO | None = None
) -> StageRun:
    """Submit `request` through the Submit RPC `method`, follow the job to its end and say how it ended."""
    import grpc  # noqa: PLC0415

    from cryostack.jobs.v1 import jobs_pb2  # noqa: PLC0415

    stream = stream or sys.stderr

    try:
        job = client.submit(method, request)
    except grpc.RpcError as error:
        print(f"cryostack {command}: {error.code().name}: {error.details()}", file=stream)
        bad_request = error.code() == grpc.StatusCode.INVALID_ARGUMENT
        return StageRun(EXIT_BAD_REQUEST if bad_request else EXIT_FAILED, None)
    print(f"submitted {job.name} to {client.address}", file=stream)
    job = follow(client, job, stream=stream)
    if job.state != jobs_pb2.JOB_STATE_SUCCEEDED:
        state = jobs_pb2.JobState.Name(job.state)
        print(f"cryostack {command}: {job.name} ended {state}: {job.error.message}", file=stream)
        return StageRun(EXIT_FAILED, job)
    return StageRun(EXIT_OK, job)
