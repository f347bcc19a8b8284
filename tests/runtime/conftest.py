"""Fixtures of the runtime tests: job stores in the real object store of `tests/conftest.py`, in-process servers
and replica processes, all serving the counting job kind of `counting_job.py`."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from counting_job import register

from cryostack.config import ServiceSettings
from cryostack.io.objectstore import ObjectStore
from cryostack.runtime import CryostackServer, JobRunner, JobStore, create_server
from cryostack.runtime.client import JobClient

SERVER_SCRIPT = Path(__file__).resolve().parent / "counting_server.py"
PROCESS_START_TIMEOUT_S = 60.0
# Short leases and polls keep the multi-replica tests to seconds.
RUNNER_TIMINGS = {"lease_s": 1.5, "cancel_poll_s": 0.2, "progress_write_s": 0.2}


@pytest.fixture
def jobs_uri(bucket: str) -> str:
    """The jobs prefix in the test's own bucket, so tests never see each other's jobs."""
    return f"s3://{bucket}/jobs"


@pytest.fixture
def job_store(object_store: ObjectStore, jobs_uri: str) -> JobStore:
    """A job store under the test's jobs prefix."""
    return JobStore(object_store, jobs_uri)


@dataclass
class LocalServer:
    """An in-process server with its runner, store and a client connected to it."""

    server: CryostackServer
    port: int
    runner: JobRunner
    store: JobStore
    client: JobClient

    @property
    def address(self) -> str:
        """host:port of the server."""
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def start_server(job_store: JobStore, jobs_uri: str) -> Iterator[Callable[..., LocalServer]]:
    """Start in-process servers of the counting service: `start_server(**service_settings)`."""
    started: list[LocalServer] = []

    def start(**overrides: object) -> LocalServer:
        settings = ServiceSettings(jobs_uri=jobs_uri, **overrides)
        runner = JobRunner(job_store, settings, **RUNNER_TIMINGS)
        server, port = create_server(settings, runner, register)
        server.start()
        token = settings.auth_token.get_secret_value() if settings.auth_token else None
        local = LocalServer(server, port, runner, job_store, JobClient(f"127.0.0.1:{port}", auth_token=token))
        started.append(local)
        return local

    yield start
    for local in started:
        local.client.close()
        local.server.stop(0).wait()


@dataclass
class ReplicaProcess:
    """A server process of the counting service."""

    process: subprocess.Popen[str]
    port: int

    @property
    def address(self) -> str:
        """host:port of the server."""
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def start_replica(object_store: ObjectStore, jobs_uri: str, tmp_path: Path) -> Iterator[Callable[[], ReplicaProcess]]:
    """Start server processes sharing the test's jobs prefix; each is killed at teardown if still running."""
    started: list[ReplicaProcess] = []
    settings = object_store.settings
    env = {
        **os.environ,
        "CRYOSTACK_S3_ENDPOINT": settings.endpoint,
        "CRYOSTACK_S3_ACCESS_KEY": settings.access_key.get_secret_value(),
        "CRYOSTACK_S3_SECRET_KEY": settings.secret_key.get_secret_value(),
        "CRYOSTACK_S3_SECURE": str(settings.secure).lower(),
        "CRYOSTACK_JOBS_URI": jobs_uri,
        "CRYOSTACK_PORT": "0",
        "CRYOSTACK_GRACE_PERIOD_S": "2",
        "CRYOSTACK_BACKEND": "numpy",
    }

    def start() -> ReplicaProcess:
        log_path = tmp_path / f"replica-{len(started)}.log"
        with log_path.open("w") as log:  # the server's log, kept for reading after a failure
            process = subprocess.Popen(
                [sys.executable, str(SERVER_SCRIPT)], env=env, stdout=subprocess.PIPE, stderr=log, text=True
            )
        ready, _, _ = select.select([process.stdout], [], [], PROCESS_START_TIMEOUT_S)
        line = process.stdout.readline() if ready and process.stdout else ""
        if not line.startswith("PORT "):
            process.kill()
            raise RuntimeError(f"replica process did not start (first line {line!r})")
        replica = ReplicaProcess(process, int(line.split()[1]))
        started.append(replica)
        return replica

    yield start
    for replica in started:
        if replica.process.poll() is None:
            replica.process.kill()
        replica.process.wait()
