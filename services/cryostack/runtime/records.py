"""The persisted form of a job: the `Job` message plus what replicas need to share it (owner, lease, request)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import any_pb2, json_format, timestamp_pb2
from google.protobuf.message import Message

from cryostack.errors import InvalidArgumentError
from cryostack.jobs.v1 import jobs_pb2

JOB_NAME_PREFIX = "jobs/"
_JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
RECORD_FORMAT_VERSION = 1

TERMINAL_STATES = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED})
ACTIVE_STATES = frozenset({jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING})


def job_id_for(kind: str, idempotency_key: str) -> str:
    """The job id of (kind, idempotency key): the same pair names the same job on every replica."""
    return hashlib.sha256(f"{kind}\n{idempotency_key}".encode()).hexdigest()[:32]


def job_name(job_id: str) -> str:
    """The resource name "jobs/<job-id>" of a job id."""
    return JOB_NAME_PREFIX + job_id


def parse_job_name(name: str) -> str:
    """The job id in a resource name "jobs/<job-id>"; INVALID_ARGUMENT for anything else."""
    job_id = name[len(JOB_NAME_PREFIX) :] if name.startswith(JOB_NAME_PREFIX) else ""
    if not _JOB_ID_PATTERN.match(job_id):
        raise InvalidArgumentError("name", f"expected 'jobs/<32 hex digits>', got {name[:80]!r}")
    return job_id


def request_fingerprint(request: Message) -> str:
    """sha256 of a request's deterministic wire form: equal parameters, equal fingerprint."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def timestamp_now() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class JobRecord:
    """One job as stored in `jobs/<job-id>/status.json`; only the replica that owns it writes it."""

    job: jobs_pb2.Job
    request_type: str
    request_bytes: bytes
    request_sha256: str
    owner: str = ""
    lease_expires_at: float = 0.0
    revision: int = 0
    input_uris: list[str] = field(default_factory=list)

    @property
    def job_id(self) -> str:
        """The id part of the job's name."""
        return self.job.name[len(JOB_NAME_PREFIX) :]

    @property
    def done(self) -> bool:
        """True once the job reached a terminal state."""
        return self.job.state in TERMINAL_STATES

    def lease_expired(self, now: float | None = None) -> bool:
        """True when the owner stopped renewing its lease (it died or stopped) while the job was active."""
        return (time.time() if now is None else now) >= self.lease_expires_at

    def public_job(self, now: float | None = None) -> jobs_pb2.Job:
        """A copy of the Job message as clients see it: `interrupted` when active under an expired lease."""
        job = jobs_pb2.Job()
        job.CopyFrom(self.job)
        if job.state in ACTIVE_STATES and self.lease_expired(now):
            job.interrupted = True
        return job

    def to_json(self) -> bytes:
        """The record as UTF-8 JSON; the typed result and the request travel as base64 wire bytes."""
        job = jobs_pb2.Job()
        job.CopyFrom(self.job)
        job.ClearField("result")
        document: dict[str, Any] = {
            "format_version": RECORD_FORMAT_VERSION,
            "job": json_format.MessageToDict(job, preserving_proto_field_name=True),
            "result": (
                {"type_url": self.job.result.type_url, "value": _b64(self.job.result.value)}
                if self.job.HasField("result")
                else None
            ),
            "request": {"type": self.request_type, "value": _b64(self.request_bytes), "sha256": self.request_sha256},
            "owner": self.owner,
            "lease_expires_at": self.lease_expires_at,
            "revision": self.revision,
            "input_uris": list(self.input_uris),
        }
        return json.dumps(document, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> JobRecord:
        """Parse a record written by :meth:`to_json`."""
        document = json.loads(data)
        job = json_format.ParseDict(document["job"], jobs_pb2.Job())
        if document.get("result"):
            job.result.CopyFrom(
                any_pb2.Any(
                    type_url=document["result"]["type_url"],
                    value=base64.b64decode(document["result"]["value"]),
                )
            )
        request = document["request"]
        return cls(
            job=job,
            request_type=request["type"],
            request_bytes=base64.b64decode(request["value"]),
            request_sha256=request["sha256"],
            owner=document.get("owner", ""),
            lease_expires_at=float(document.get("lease_expires_at", 0.0)),
            revision=int(document.get("revision", 0)),
            input_uris=list(document.get("input_uris", [])),
        )

    def copy(self) -> JobRecord:
        """A deep copy (the Job message is copied, not shared)."""
        job = jobs_pb2.Job()
        job.CopyFrom(self.job)
        return JobRecord(
            job=job,
            request_type=self.request_type,
            request_bytes=self.request_bytes,
            request_sha256=self.request_sha256,
            owner=self.owner,
            lease_expires_at=self.lease_expires_at,
            revision=self.revision,
            input_uris=list(self.input_uris),
        )
