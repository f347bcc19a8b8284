"""Client of the job API: submit to any stage service, then get, watch, wait for, cancel and list jobs.

Calls are retried on UNAVAILABLE (with exponential backoff and jitter); submissions are also retried, with
backoff, while the replica answers RESOURCE_EXHAUSTED. Any other status is raised as `grpc.RpcError`.
Submitting again after a lost answer is safe because jobs are idempotent by their key; submitting again is also
how a job whose replica died (`JobInterruptedError`) is resumed from its last checkpoint.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from cryostack.jobs.v1 import jobs_pb2, jobs_pb2_grpc

T = TypeVar("T")

SubmitMethod = str | grpc.UnaryUnaryMultiCallable


class JobInterruptedError(Exception):
    """The watched job is QUEUED/RUNNING but no replica runs it; resubmit it with the same key to resume it."""

    def __init__(self, job: jobs_pb2.Job) -> None:
        super().__init__(f"{job.name} was interrupted (its replica stopped); resubmit it to resume")
        self.job = job


def submit_method(service_descriptor_owner: object, service: str, rpc: str) -> str:
    """The full method path "/package.Service/Rpc" of a Submit RPC, from a generated `*_pb2` module."""
    descriptor = service_descriptor_owner.DESCRIPTOR.services_by_name[service]  # type: ignore[attr-defined]
    return f"/{descriptor.full_name}/{descriptor.methods_by_name[rpc].name}"


@dataclass(frozen=True)
class TlsClientFiles:
    """PEM files of a TLS connection: the CA that signed the server, and for mTLS the client's certificate and key."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None


def open_channel(address: str, tls: TlsClientFiles | None = None) -> grpc.Channel:
    """A channel to `address`: plaintext, or TLS (mTLS when the client certificate is given)."""
    if tls is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(tls.ca_file).read_bytes(),
        private_key=Path(tls.key_file).read_bytes() if tls.key_file else None,
        certificate_chain=Path(tls.cert_file).read_bytes() if tls.cert_file else None,
    )
    return grpc.secure_channel(address, credentials)


class JobClient:
    """A connection to one cryostack service address (any replica serves the job API for every job)."""

    def __init__(
        self,
        address: str,
        *,
        auth_token: str | None = None,
        max_attempts: int = 5,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        busy_timeout_s: float = 600.0,
        tls: TlsClientFiles | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.address = address
        self.channel = channel if channel is not None else open_channel(address, tls)
        self._jobs = jobs_pb2_grpc.JobServiceStub(self.channel)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {auth_token}"),) if auth_token else ()
        self._max_attempts = max_attempts
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._busy_timeout_s = busy_timeout_s

    def __enter__(self) -> JobClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()

    def submit(self, method: SubmitMethod, request: Message, *, timeout_s: float = 30.0) -> jobs_pb2.Job:
        """Call a stage's Submit RPC (a method path like "/cryostack.classify2d.v1.Classify2DService/
        SubmitClassify2D", or a stub's method) and return the job handle."""
        rpc = (
            self.channel.unary_unary(
                method, request_serializer=_serialize, response_deserializer=jobs_pb2.Job.FromString
            )
            if isinstance(method, str)
            else method
        )
        return self._call(lambda: rpc(request, timeout=timeout_s, metadata=self._metadata), retry_busy=True)

    def get(self, name: str, *, timeout_s: float = 30.0) -> jobs_pb2.Job:
        """The job's current state."""
        request = jobs_pb2.GetJobRequest(name=name)
        return self._call(lambda: self._jobs.GetJob(request, timeout=timeout_s, metadata=self._metadata))

    def cancel(self, name: str, *, timeout_s: float = 30.0) -> jobs_pb2.Job:
        """Request cancellation; returns the job (already finished jobs are unchanged)."""
        request = jobs_pb2.CancelJobRequest(name=name)
        return self._call(lambda: self._jobs.CancelJob(request, timeout=timeout_s, metadata=self._metadata))

    def list(
        self,
        *,
        service: str = "",
        states: Iterable[jobs_pb2.JobState.ValueType] = (),
        page_size: int = 0,
        timeout_s: float = 30.0,
    ) -> Iterator[jobs_pb2.Job]:
        """Every job matching the filters, newest first, fetching page after page."""
        page_token = ""
        while True:
            request = jobs_pb2.ListJobsRequest(
                service=service, states=list(states), page_size=page_size, page_token=page_token
            )
            response = self._call(
                lambda request=request: self._jobs.ListJobs(request, timeout=timeout_s, metadata=self._metadata)
            )
            yield from response.jobs
            page_token = response.next_page_token
            if not page_token:
                return

    def watch(self, name: str, *, timeout_s: float | None = None) -> Iterator[jobs_pb2.Job]:
        """The job's current state, then each change, until it is done; reconnects when the server goes away.

        Raises `JobInterruptedError` (after yielding that state) when no replica runs the job any more, and
        `grpc.RpcError` DEADLINE_EXCEEDED when `timeout_s`, which bounds the whole watch, passes.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        request = jobs_pb2.WatchJobRequest(name=name)
        failures = 0
        last_seen: bytes | None = None
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                for job in self._jobs.WatchJob(request, timeout=remaining, metadata=self._metadata):
                    failures = 0
                    fingerprint = job.SerializeToString(deterministic=True)
                    if fingerprint != last_seen:  # a reconnect repeats the current state first
                        last_seen = fingerprint
                        yield job
                    if job.done:
                        return
                    if job.interrupted:
                        raise JobInterruptedError(job)
            except grpc.RpcError as error:
                failures += 1
                if error.code() != grpc.StatusCode.UNAVAILABLE or failures >= self._max_attempts:
                    raise
                time.sleep(self._backoff(failures))
                continue
            # The stream ended without a finished job (the replica stopped): follow it again.
            failures += 1
            if failures >= self._max_attempts:
                raise ConnectionError(f"the watch of {name} kept ending before the job finished")
            time.sleep(self._backoff(failures))

    def wait(self, name: str, *, timeout_s: float | None = None) -> jobs_pb2.Job:
        """Block until the job is done and return it (check `state`, `error` and `result`); raises
        `JobInterruptedError` when no replica runs it any more."""
        last: jobs_pb2.Job | None = None
        for job in self.watch(name, timeout_s=timeout_s):
            last = job
        if last is None or not last.done:
            raise ConnectionError(f"the watch of {name} ended before the job finished")
        return last

    def _call(self, call: Callable[[], T], *, retry_busy: bool = False) -> T:
        """Run one RPC, retrying UNAVAILABLE (and, if asked, RESOURCE_EXHAUSTED) with backoff."""
        unavailable = busy = 0
        busy_deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                return call()
            except grpc.RpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNAVAILABLE and unavailable + 1 < self._max_attempts:
                    unavailable += 1
                    time.sleep(self._backoff(unavailable))
                elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_busy:
                    busy += 1
                    pause_s = self._backoff(busy)
                    if time.monotonic() + pause_s > busy_deadline:
                        raise
                    time.sleep(pause_s)
                else:
                    raise

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter for the attempt-th retry."""
        ceiling = min(self._backoff_max_s, self._backoff_initial_s * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
