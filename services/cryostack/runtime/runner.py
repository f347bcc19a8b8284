"""The transport-free job runner: idempotent submission, a bounded worker pool and queue, progress, cancellation,
leases that let another replica resume a job whose owner died, and manifests written last.

Every replica shares one `JobStore`. The replica that runs a job owns its record and renews a lease on it; any
replica answers Get/Watch/List from the store, and a cancellation requested anywhere reaches the owner through
a marker object it polls. Clocks of replicas are assumed to agree to well within the lease duration.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import platform
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from importlib import metadata
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import status_pb2

from cryostack.config import ServiceSettings
from cryostack.core.backend import describe_backend
from cryostack.errors import (
    CancelledError,
    CryostackError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from cryostack.jobs.v1 import jobs_pb2
from cryostack.runtime.context import JobContext
from cryostack.runtime.kinds import JobKind
from cryostack.runtime.records import (
    ACTIVE_STATES,
    JobRecord,
    job_id_for,
    job_name,
    parse_job_name,
    request_fingerprint,
    timestamp_now,
)
from cryostack.runtime.status import rpc_status_for
from cryostack.runtime.store import JobStore, OutputObject

MAX_IDEMPOTENCY_KEY_CHARS = 256
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
MANIFEST_FORMAT_VERSION = 1
_WATCH_POLL_MIN_S = 0.05


def _software_version() -> str:
    """The installed version of the services distribution (the code that produced a job's outputs)."""
    try:
        return metadata.version("cryostack-services")
    except metadata.PackageNotFoundError:
        return "unknown"


class ActiveJob:
    """A job queued or running in this replica: the in-memory record that local watchers follow."""

    def __init__(self, kind: JobKind[Any], record: JobRecord, request: Message, runner: JobRunner) -> None:
        self.kind = kind
        self.record = record
        self.request = request
        self.store = runner.store
        self.job_id = record.job_id
        self.outputs: dict[str, OutputObject] = {}
        self.cancel_event = threading.Event()
        self.condition = threading.Condition()  # guards `record`; notified on every change
        self.write_lock = threading.Lock()  # keeps store writes of this record in revision order
        self.last_write_s = 0.0
        self.persisted_revision = -1
        self.enqueued = False  # until then the record may not exist in the store yet: housekeeping leaves it alone
        self._runner = runner

    def job(self) -> jobs_pb2.Job:
        """A copy of the current Job message."""
        with self.condition:
            job = jobs_pb2.Job()
            job.CopyFrom(self.record.job)
            return job

    def should_stop(self) -> bool:
        """True when cancellation was requested or the replica is stopping."""
        return self.cancel_event.is_set() or self._runner.stopping

    def change(self, **job_fields: Any) -> None:
        """Set fields of the Job message, bump the revision and wake the watchers."""
        with self.condition:
            for key, value in job_fields.items():
                if isinstance(value, Message):
                    getattr(self.record.job, key).CopyFrom(value)
                else:
                    setattr(self.record.job, key, value)
            self._touch()

    def update_progress(self, *, summary: Mapping[str, float] | None = None, **fields: Any) -> None:
        """Set the given progress fields (None leaves a field as it is)."""
        with self.condition:
            progress = self.record.job.progress
            for key, value in fields.items():
                if value is not None:
                    setattr(progress, key, value)
            if summary is not None:
                progress.summary.clear()
                progress.summary.update({str(k): float(v) for k, v in summary.items()})
            self._touch()
        self._runner.persist_if_due(self)

    def finish(
        self,
        state: jobs_pb2.JobState.ValueType,
        *,
        error: status_pb2.Status | None = None,
        result: Message | None = None,
        manifest_uri: str = "",
    ) -> None:
        """Move to a terminal state."""
        with self.condition:
            job = self.record.job
            job.state = state
            job.done = True
            job.end_time.CopyFrom(timestamp_now())
            if error is not None:
                job.error.CopyFrom(error)
                job.progress.message = error.message
            if result is not None:
                job.result.Pack(result)
                job.manifest_uri = manifest_uri
                job.progress.fraction = 1.0
                job.progress.message = "succeeded"
            self._touch()

    def _touch(self) -> None:
        self.record.job.update_time.CopyFrom(timestamp_now())
        self.record.revision += 1
        self.condition.notify_all()


class JobRunner:
    """Runs registered job kinds on a bounded pool of worker threads, with job state in a shared `JobStore`."""

    def __init__(
        self,
        store: JobStore,
        settings: ServiceSettings,
        *,
        replica_id: str | None = None,
        lease_s: float = 30.0,
        heartbeat_s: float | None = None,
        cancel_poll_s: float = 1.0,
        progress_write_s: float = 1.0,
        watch_poll_max_s: float = 2.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lease_s = lease_s
        self._heartbeat_s = heartbeat_s if heartbeat_s is not None else lease_s / 3
        self._cancel_poll_s = cancel_poll_s
        self._progress_write_s = progress_write_s
        self._watch_poll_max_s = watch_poll_max_s
        self._logger = logger or logging.getLogger("cryostack.runtime")
        self._backend = describe_backend()
        self._kinds: dict[str, JobKind[Any]] = {}
        self._active: dict[str, ActiveJob] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[ActiveJob | None] = queue.Queue()
        self._stopping = threading.Event()
        # Daemon threads: a job that ignores cancellation must not keep a stopping replica alive.
        self._workers = [
            threading.Thread(target=self._work, name=f"cryostack-worker-{i}", daemon=True)
            for i in range(settings.max_workers)
        ]
        self._housekeeper = threading.Thread(target=self._housekeep, name="cryostack-housekeeping", daemon=True)
        for thread in [*self._workers, self._housekeeper]:
            thread.start()

    @property
    def stopping(self) -> bool:
        """True once `shutdown` was called."""
        return self._stopping.is_set()

    def register(self, kind: JobKind[Any]) -> None:
        """Make a job kind submittable; names are unique per runner."""
        if kind.name in self._kinds:
            raise ValueError(f"job kind {kind.name!r} is already registered")
        self._kinds[kind.name] = kind

    def submit(self, kind_name: str, request: Message) -> jobs_pb2.Job:
        """Validate and queue a job, or return the job its idempotency key already names.

        Resubmitting a key with the same parameters returns the existing job; a job that is RUNNING/QUEUED
        under an expired lease (its replica died), CANCELLED, or FAILED with UNAVAILABLE is started again and
        resumes from its checkpoints. The same key with different parameters is INVALID_ARGUMENT.
        """
        kind = self._kinds.get(kind_name)
        if kind is None:
            raise ValueError(f"job kind {kind_name!r} is not registered")
        if not isinstance(request, kind.request_type):
            raise TypeError(f"{kind_name} takes {kind.request_type.__name__}, got {type(request).__name__}")
        if self.stopping:
            raise UnavailableError("this replica is shutting down; retry on another replica")
        kind.validate(request)
        key = kind.idempotency_key(request)
        if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
            raise InvalidArgumentError("idempotency_key", f"longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        key = key or f"generated-{uuid.uuid4().hex}"
        job_id = job_id_for(kind.name, key)
        fingerprint = request_fingerprint(request)

        with self._lock:
            active = self._active.get(job_id)
        if active is not None:
            self._check_same_request(active.record, fingerprint)
            return active.job()
        existing = self.store.read_optional(job_id)
        if existing is None:
            record = self._new_record(kind, request, key, job_id, fingerprint)
            active, reserved = self._reserve(kind, record, request)
            if not reserved:
                return active.job()
            try:
                created = self.store.create(record)
            except BaseException:
                self._release(active)
                raise
            if created:
                self._logger.info("queued %s (%s)", record.job.name, kind.name)
                return self._enqueue(active)
            self._release(active)
            existing = self.store.read(job_id)
        self._check_same_request(existing, fingerprint)
        if self._resumable(existing):
            return self._resume(kind, existing, request)
        return existing.public_job()

    def get(self, name: str) -> jobs_pb2.Job:
        """The current state of a job, from memory when it runs here, else from the store."""
        job_id = parse_job_name(name)
        active = self._local(job_id)
        return active.job() if active is not None else self.store.read(job_id).public_job()

    def watch(self, name: str, stop: threading.Event | None = None) -> Iterator[jobs_pb2.Job]:
        """Yield the job's current state, then each change, until it is done or interrupted (or `stop` is set)."""
        job_id = parse_job_name(name)
        stop = stop or threading.Event()
        active = self._local(job_id)
        if active is not None:
            return self._watch_local(active, stop)
        first = self.store.read(job_id)  # NOT_FOUND before the stream starts
        return self._watch_store(first, stop)

    def cancel(self, name: str) -> jobs_pb2.Job:
        """Request cancellation; the job stops at its next check. Finished jobs are returned unchanged."""
        job_id = parse_job_name(name)
        active = self._local(job_id)
        if active is not None:
            self._cancel_local(active)
            return active.job()
        record = self.store.read(job_id)
        if record.done:
            return record.public_job()
        self.store.request_cancel(job_id)
        if record.lease_expired() and self.store.claim_attempt(job_id, record.job.attempt + 1, self.replica_id):
            # Nobody runs it (its replica died or stopped): settle the record here.
            record.job.attempt += 1
            self._settle_cancelled(record.job)
            record.revision += 1
            self.store.write(record)
            return record.public_job()
        record.job.cancel_requested = True
        return record.public_job()

    def list(
        self,
        *,
        service: str = "",
        states: Iterable[jobs_pb2.JobState.ValueType] = (),
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[jobs_pb2.Job], str]:
        """One page of jobs, newest first, and the token of the next page ('' on the last)."""
        if page_size < 0:
            raise InvalidArgumentError("page_size", "must not be negative")
        page_size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_page_token(page_token) if page_token else None
        wanted_states = set(states)
        jobs = {record.job_id: record.public_job() for record in self.store.iter_records()}
        with self._lock:
            local = [active for active in self._active.values() if active.enqueued]
        jobs.update({active.job_id: active.job() for active in local})
        selected = sorted(
            (
                job
                for job in jobs.values()
                if (not service or job.service == service) and (not wanted_states or job.state in wanted_states)
            ),
            key=_list_order,
        )
        if after is not None:
            selected = [job for job in selected if _list_order(job) > after]
        page = selected[:page_size]
        next_token = _encode_page_token(_list_order(page[-1])) if len(selected) > page_size else ""
        return page, next_token

    def shutdown(self, wait_s: float = 5.0) -> None:
        """Stop taking jobs; running jobs stop at their next cancellation check and stay resumable elsewhere."""
        if self.stopping:
            return
        self._stopping.set()
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + wait_s
        for thread in self._workers:
            thread.join(max(0.0, deadline - time.monotonic()))

    def persist_if_due(self, active: ActiveJob) -> None:
        """Write the record if the last write is older than the progress interval (watchers elsewhere poll it)."""
        if time.monotonic() - active.last_write_s >= self._progress_write_s:
            self._persist_quietly(active)

    # -- submission -------------------------------------------------------------------------------------------

    def _new_record(self, kind: JobKind[Any], request: Message, key: str, job_id: str, fingerprint: str) -> JobRecord:
        now = timestamp_now()
        job = jobs_pb2.Job(
            name=job_name(job_id),
            service=kind.service,
            kind=kind.name,
            idempotency_key=key,
            state=jobs_pb2.JOB_STATE_QUEUED,
            outputs_uri=self.store.outputs_uri(job_id, kind.output_prefix(request)),
            random_seed=kind.random_seed(request) or int(job_id[:15], 16),
            attempt=1,
            backend=self._backend["backend"],
            device=self._backend.get("device", "cpu"),
            progress=jobs_pb2.JobProgress(message="queued"),
        )
        job.create_time.CopyFrom(now)
        job.update_time.CopyFrom(now)
        return JobRecord(
            job=job,
            request_type=request.DESCRIPTOR.full_name,
            request_bytes=request.SerializeToString(deterministic=True),
            request_sha256=fingerprint,
            owner=self.replica_id,
            lease_expires_at=time.time() + self._lease_s,
            input_uris=kind.input_uris(request),
        )

    def _check_same_request(self, record: JobRecord, fingerprint: str) -> None:
        if record.request_sha256 != fingerprint:
            raise InvalidArgumentError(
                "idempotency_key",
                f"{record.job.idempotency_key!r} already names {record.job.name} with different parameters; "
                "use a new key",
            )

    @staticmethod
    def _resumable(record: JobRecord) -> bool:
        job = record.job
        if job.state in ACTIVE_STATES:
            return record.lease_expired()
        if job.state == jobs_pb2.JOB_STATE_FAILED:
            return job.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
        return job.state == jobs_pb2.JOB_STATE_CANCELLED

    def _resume(self, kind: JobKind[Any], existing: JobRecord, request: Message) -> jobs_pb2.Job:
        record = existing.copy()
        job = record.job
        job.attempt += 1
        job.state = jobs_pb2.JOB_STATE_QUEUED
        job.done = False
        job.cancel_requested = False
        job.interrupted = False
        job.backend = self._backend["backend"]
        job.device = self._backend.get("device", "cpu")
        for name in ("error", "result", "end_time"):
            job.ClearField(name)
        job.progress.message = f"resuming from the last checkpoint (attempt {job.attempt})"
        job.update_time.CopyFrom(timestamp_now())
        record.owner = self.replica_id
        record.lease_expires_at = time.time() + self._lease_s
        record.revision += 1
        active, reserved = self._reserve(kind, record, request)
        if not reserved:
            return active.job()
        try:
            if not self.store.claim_attempt(record.job_id, job.attempt, self.replica_id):
                self._release(active)
                return self.store.read(record.job_id).public_job()  # another replica took it over first
            self.store.clear_cancel(record.job_id)
            self.store.write(record)
        except BaseException:
            self._release(active)
            raise
        self._logger.info("resuming %s, attempt %d", job.name, job.attempt)
        return self._enqueue(active)

    def _reserve(self, kind: JobKind[Any], record: JobRecord, request: Message) -> tuple[ActiveJob, bool]:
        """Take a pool slot for the job; (the job already here, False) when a concurrent submit won."""
        with self._lock:
            if self.stopping:
                raise UnavailableError("this replica is shutting down; retry on another replica")
            existing = self._active.get(record.job_id)
            if existing is not None:
                return existing, False
            capacity = self.settings.max_workers + self.settings.max_queued_jobs
            if len(self._active) >= capacity:
                raise ResourceExhaustedError(
                    f"this replica already runs or queues {len(self._active)} jobs "
                    f"(max_workers + max_queued_jobs = {capacity}); retry later"
                )
            active = ActiveJob(kind, record, request, self)
            self._active[record.job_id] = active
            return active, True

    def _local(self, job_id: str) -> ActiveJob | None:
        """The job if it is queued or running in this replica (and its record is in the store)."""
        with self._lock:
            active = self._active.get(job_id)
            return active if active is not None and active.enqueued else None

    def _enqueue(self, active: ActiveJob) -> jobs_pb2.Job:
        """Hand the job to the workers; returns its state as submitted (QUEUED)."""
        job = active.job()
        with self._lock:
            active.enqueued = True
        self._queue.put(active)
        return job

    def _release(self, active: ActiveJob) -> None:
        """Give the job's pool slot back (unless a newer attempt of the same job took the slot meanwhile)."""
        with self._lock:
            if self._active.get(active.job_id) is active:
                del self._active[active.job_id]

    # -- execution --------------------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            active = self._queue.get()
            if active is None:
                return
            try:
                self._run(active)
            except Exception:  # a failure to record a failure: log it, keep the worker alive
                self._logger.exception("worker failed while handling %s", active.record.job.name)
            finally:
                self._release(active)

    def _run(self, active: ActiveJob) -> None:
        with active.condition:
            if active.record.done:  # cancelled while it waited in the queue
                return
            if active.should_stop():
                self._stop(active)
                return
            if not active.record.job.HasField("start_time"):
                active.record.job.start_time.CopyFrom(timestamp_now())
            active.change(state=jobs_pb2.JOB_STATE_RUNNING, progress=jobs_pb2.JobProgress(message="running"))
        self._persist_quietly(active)
        name = active.record.job.name
        context = JobContext(active, self.store.objects, self._logger.getChild(active.job_id))
        try:
            result = active.kind.run(context, active.request)
            if not isinstance(result, Message):
                raise TypeError(f"job kind {active.kind.name} returned {type(result).__name__}, not a message")
            manifest_uri = self._publish(active, result)
            active.finish(jobs_pb2.JOB_STATE_SUCCEEDED, result=result, manifest_uri=manifest_uri)
            self._logger.info("%s succeeded", name)
        except CancelledError:
            self._stop(active)
        except Exception as error:  # noqa: BLE001  (every failure becomes the job's error status)
            status = rpc_status_for(error, self._logger, f"job {name}")
            active.finish(jobs_pb2.JOB_STATE_FAILED, error=status)
            self._logger.info("%s failed: %s", name, status.message)
        self._persist_quietly(active)

    def _stop(self, active: ActiveJob) -> None:
        """End a job that stopped at a cancellation check: CANCELLED, or released for resumption elsewhere."""
        if active.cancel_event.is_set():
            with active.condition:
                self._settle_cancelled(active.record.job)
                active.change()
            return
        with active.condition:
            active.record.owner = ""
            active.record.lease_expires_at = 0.0
            active.change(
                interrupted=True,
                progress=jobs_pb2.JobProgress(
                    message="interrupted: the replica stopped; resubmit with the same idempotency key to resume"
                ),
            )

    @staticmethod
    def _settle_cancelled(job: jobs_pb2.Job) -> None:
        job.state = jobs_pb2.JOB_STATE_CANCELLED
        job.done = True
        job.cancel_requested = True
        job.end_time.CopyFrom(timestamp_now())
        job.update_time.CopyFrom(job.end_time)
        job.error.CopyFrom(status_pb2.Status(code=grpc.StatusCode.CANCELLED.value[0], message="cancelled by request"))
        job.progress.message = "cancelled"

    def _publish(self, active: ActiveJob, result: Message) -> str:
        """Write the manifest (every output with size and sha256, parameters, provenance) after all outputs."""
        outputs = dict(active.outputs)
        job = active.job()
        for relpath in self.store.list_outputs(job.outputs_uri):
            if relpath not in outputs:  # written by a streaming writer or an earlier attempt
                outputs[relpath] = self.store.describe_output(job.outputs_uri, relpath)
        manifest = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "job": job.name,
            "service": job.service,
            "kind": job.kind,
            "idempotency_key": job.idempotency_key,
            "attempt": job.attempt,
            "software": {
                "cryostack-services": _software_version(),
                "python": platform.python_version(),
            },
            "backend": job.backend,
            "device": job.device,
            "random_seed": job.random_seed,
            "input_uris": list(active.record.input_uris),
            "parameters": {
                "type": active.record.request_type,
                "value": json_format.MessageToDict(active.request, preserving_proto_field_name=True),
            },
            "result": {
                "type": result.DESCRIPTOR.full_name,
                "value": json_format.MessageToDict(result, preserving_proto_field_name=True),
            },
            "outputs": [
                {"path": o.path, "uri": o.uri, "size_bytes": o.size_bytes, "sha256": o.sha256}
                for o in sorted(outputs.values(), key=lambda o: o.path)
            ],
            "created": job.create_time.ToJsonString(),
            "finished": timestamp_now().ToJsonString(),
        }
        return self.store.write_manifest(job.outputs_uri, manifest)

    # -- cancellation, leases and persistence -------------------------------------------------------------------

    def _cancel_local(self, active: ActiveJob) -> None:
        active.cancel_event.set()
        with active.condition:
            if active.record.done:
                return
            was_queued = active.record.job.state == jobs_pb2.JOB_STATE_QUEUED
            if was_queued:
                self._settle_cancelled(active.record.job)
            else:
                active.record.job.cancel_requested = True
            active.change()
        self._persist_quietly(active)
        if was_queued:  # it never ran: free its slot now rather than when a worker reaches it
            self._release(active)

    def _housekeep(self) -> None:
        """Renew leases, pick up cancellation requested on other replicas and flush throttled progress."""
        tick_s = min(self._heartbeat_s, self._cancel_poll_s, self._progress_write_s) / 2
        last_heartbeat = last_cancel_poll = time.monotonic()
        while not self._stopping.wait(tick_s):
            now = time.monotonic()
            heartbeat = now - last_heartbeat >= self._heartbeat_s
            poll_cancel = now - last_cancel_poll >= self._cancel_poll_s
            last_heartbeat = now if heartbeat else last_heartbeat
            last_cancel_poll = now if poll_cancel else last_cancel_poll
            with self._lock:
                local = [active for active in self._active.values() if active.enqueued]
            for active in local:
                try:
                    if poll_cancel and not active.cancel_event.is_set() and self.store.cancel_requested(active.job_id):
                        self._cancel_local(active)
                    if heartbeat:
                        with active.condition:
                            if active.record.owner != self.replica_id:  # released when the replica stopped
                                continue
                            active.record.lease_expires_at = time.time() + self._lease_s
                        self._persist(active, force=True)
                    elif active.record.revision != active.persisted_revision:
                        self.persist_if_due(active)
                except CryostackError as error:
                    self._logger.warning("housekeeping of %s failed: %s", active.record.job.name, error)

    def _persist(self, active: ActiveJob, *, force: bool = False) -> None:
        with active.write_lock:
            with active.condition:
                if not force and active.record.revision == active.persisted_revision:
                    return
                snapshot = active.record.copy()
            self.store.write(snapshot)
            active.persisted_revision = snapshot.revision
            active.last_write_s = time.monotonic()

    def _persist_quietly(self, active: ActiveJob) -> None:
        """Persist, logging (not raising) store failures: the lease lets the job be resumed if state is lost."""
        try:
            self._persist(active)
        except CryostackError as error:
            self._logger.warning("could not store the state of %s: %s", active.record.job.name, error)

    # -- watching -----------------------------------------------------------------------------------------------

    def _watch_local(self, active: ActiveJob, stop: threading.Event) -> Iterator[jobs_pb2.Job]:
        revision = -1
        while True:
            with active.condition:
                while active.record.revision == revision and not stop.is_set() and not self.stopping:
                    active.condition.wait(timeout=0.5)
                if active.record.revision == revision:
                    return
                revision = active.record.revision
                job = active.job()
            yield job
            if job.done or job.interrupted:
                return

    def _watch_store(self, first: JobRecord, stop: threading.Event) -> Iterator[jobs_pb2.Job]:
        """Poll the stored record with backoff; ends when the job is done or interrupted (nobody runs it)."""
        record, job = first, first.public_job()
        yield job
        delay_s = _WATCH_POLL_MIN_S
        while not job.done and not job.interrupted:
            if stop.wait(delay_s):
                return
            latest = self.store.read(record.job_id)
            latest_job = latest.public_job()
            if latest.revision != record.revision or latest_job.interrupted:
                record, job = latest, latest_job
                delay_s = _WATCH_POLL_MIN_S
                yield job
            else:
                delay_s = min(delay_s * 2, self._watch_poll_max_s)


def _list_order(job: jobs_pb2.Job) -> tuple[int, int, str]:
    """Sort key of ListJobs: newest first, then by name."""
    return (-job.create_time.seconds, -job.create_time.nanos, job.name)


def _encode_page_token(key: tuple[int, int, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def _decode_page_token(token: str) -> tuple[int, int, str]:
    try:
        seconds, nanos, name = json.loads(base64.urlsafe_b64decode(token.encode()))
        return (int(seconds), int(nanos), str(name))
    except (ValueError, TypeError, binascii.Error):
        raise InvalidArgumentError("page_token", "not a token returned by ListJobs") from None
