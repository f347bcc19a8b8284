"""What the stage-chaining tests share: one in-process server running several stage services on the real store,
waiting for a job's result, and the images a STAR names read from where it lives."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
from google.protobuf.message import Message

from cryostack.config import ServiceSettings
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import ParticleStackReader
from cryostack.jobs.v1 import jobs_pb2
from cryostack.runtime import JobRunner, JobStore, create_server
from cryostack.runtime.client import JobClient

RUNNER_TIMINGS = {"lease_s": 1.5, "cancel_poll_s": 0.2, "progress_write_s": 0.2}


@contextmanager
def serve_stages(object_store: ObjectStore, bucket: str, *registrars: Callable) -> Iterator[JobClient]:
    """A client of one in-process server running the given stage services, jobs kept in the test's bucket."""
    settings = ServiceSettings(jobs_uri=f"s3://{bucket}/jobs", max_workers=1)
    runner = JobRunner(JobStore(object_store, settings.jobs_uri), settings, **RUNNER_TIMINGS)
    server, port = create_server(settings, runner, *registrars)
    server.start()
    connected = JobClient(f"127.0.0.1:{port}")
    try:
        yield connected
    finally:
        connected.close()
        server.stop(0).wait()


def finished(client: JobClient, job: jobs_pb2.Job, result: Message, timeout_s: float = 600) -> None:
    """Wait for `job`, check it succeeded and unpack its result into `result`."""
    done = client.wait(job.name, timeout_s=timeout_s)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error.message
    assert done.result.Unpack(result)


def stack_images(object_store: ObjectStore, star_uri: str) -> np.ndarray:
    """Every image a STAR object names, read through the stack reader from the STAR's own location: (N, D, D)."""
    reader = ParticleStackReader.from_star(object_store, star_uri)
    return reader.read(np.arange(len(reader)))
