"""The gRPC server factory shared by every service: job API, health, reflection, interceptors, graceful stop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cryostack.config import ObjectStoreSettings, ServiceSettings
from cryostack.io.objectstore import ObjectStore
from cryostack.io.uri import S3Uri
from cryostack.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from cryostack.runtime.interceptors import BearerTokenInterceptor, ErrorMappingInterceptor
from cryostack.runtime.job_service import JobServiceServicer
from cryostack.runtime.runner import JobRunner
from cryostack.runtime.store import JobStore

# Adds a stage's servicer to the server, registers its job kinds with the runner and returns the full names
# of the gRPC services it added (for health and reflection).
Registrar = Callable[[grpc.Server, JobRunner], Iterable[str]]

JOB_SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
# Each open WatchJob stream holds one thread; this bounds concurrent RPCs, not jobs (the runner bounds those).
RPC_THREADS = 64

_logger = logging.getLogger("cryostack.runtime")


class CryostackServer:
    """A started-or-startable gRPC server with its health servicer and job runner; `stop` is graceful."""

    def __init__(
        self,
        *,
        server: grpc.Server,
        runner: JobRunner,
        health_servicer: health.HealthServicer,
        service_names: Sequence[str],
        port: int,
        grace_period_s: float,
    ) -> None:
        self.grpc_server = server
        self.runner = runner
        self.health = health_servicer
        self.service_names = tuple(service_names)
        self.port = port
        self.grace_period_s = grace_period_s
        self._stopped = threading.Event()

    def start(self) -> None:
        """Start serving and report every service as SERVING."""
        self.grpc_server.start()
        for name in ("", *self.service_names):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_period_s: float | None = None) -> threading.Event:
        """Report NOT_SERVING, stop taking RPCs, let in-flight ones finish within the grace period and stop the
        runner (its running jobs stay resumable on another replica); returns an event set when fully stopped."""
        grace = self.grace_period_s if grace_period_s is None else grace_period_s
        if not self._stopped.is_set():
            self._stopped.set()
            self.health.enter_graceful_shutdown()
            done = self.grpc_server.stop(grace)
            self.runner.shutdown(wait_s=grace)
            return done
        return self.grpc_server.stop(grace)

    def wait_for_termination(self, timeout_s: float | None = None) -> bool:
        """Block until the server has stopped; False on timeout."""
        return self.grpc_server.wait_for_termination(timeout_s)


def server_credentials(settings: ServiceSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings' PEM files (mTLS when a client CA is given); None for plaintext."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return None
    certificate_chain = Path(settings.tls_cert_file).read_bytes()
    private_key = Path(settings.tls_key_file).read_bytes()
    client_ca = Path(settings.tls_client_ca_file).read_bytes() if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(private_key, certificate_chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def create_server(settings: ServiceSettings, runner: JobRunner, *registrars: Registrar) -> tuple[CryostackServer, int]:
    """Build (not start) a server with the job API, the given stage services, health and reflection, bound to
    `settings.host:settings.port` (port 0 picks a free one); returns it and the bound port."""
    interceptors: list[grpc.ServerInterceptor] = []
    if settings.auth_token is not None:
        interceptors.append(BearerTokenInterceptor(settings.auth_token.get_secret_value()))
    interceptors.append(ErrorMappingInterceptor(_logger))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=RPC_THREADS), interceptors=interceptors)

    jobs_pb2_grpc.add_JobServiceServicer_to_server(JobServiceServicer(runner), server)
    service_names = [JOB_SERVICE_NAME]
    for registrar in registrars:
        service_names.extend(registrar(server, runner))

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *service_names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_service_name = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
    reflection.enable_server_reflection((*service_names, health_service_name, reflection.SERVICE_NAME), server)

    address = f"{settings.host}:{settings.port}"
    credentials = server_credentials(settings)
    port = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"could not bind {settings.host}:{settings.port}")
    wrapped = CryostackServer(
        server=server,
        runner=runner,
        health_servicer=health_servicer,
        service_names=service_names,
        port=port,
        grace_period_s=settings.grace_period_s,
    )
    return wrapped, port


def run_until_signalled(server: CryostackServer) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully (NOT_SERVING first, then `stop(grace)`)."""
    requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        _logger.info("received %s; stopping within %.1f s", signal.Signals(signum).name, server.grace_period_s)
        requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not requested.wait(timeout=1.0):
            pass
        server.stop().wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    settings: ServiceSettings,
    store_settings: ObjectStoreSettings,
    *registrars: Registrar,
    on_started: Callable[[int], None] | None = None,
    **runner_options: Any,
) -> None:
    """Run one replica until SIGTERM/SIGINT: job store, runner, server; `on_started(port)` once it serves.

    `runner_options` are passed to `JobRunner` (lease and polling intervals).
    """
    objects = ObjectStore(store_settings)
    objects.ensure_bucket(S3Uri.parse(settings.jobs_uri, "jobs_uri").bucket)
    runner_options.setdefault("lease_s", settings.job_lease_s)
    runner = JobRunner(JobStore(objects, settings.jobs_uri), settings, **runner_options)
    server, port = create_server(settings, runner, *registrars)
    server.start()
    _logger.info("serving %s on %s:%d", ", ".join(server.service_names), settings.host, port)
    if on_started is not None:
        on_started(port)
    try:
        run_until_signalled(server)
    finally:
        objects.close()
