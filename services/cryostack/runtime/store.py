"""Job state in the object store: `jobs/<job-id>/` holds the status record, checkpoints, outputs and the manifest.

Layout under the jobs prefix (`ServiceSettings.jobs_uri`, e.g. ``s3://cryostack/jobs``)::

    <job-id>/status.json          the JobRecord; written by the owning replica only
    <job-id>/control/cancel       present once cancellation was requested (by any replica)
    <job-id>/control/attempt-<n>  claim of the n-th run of the job (first writer wins)
    <job-id>/checkpoints/<name>   opaque checkpoint blobs of the running job
    <job-id>/<output path>        outputs, listed in the manifest
    <job-id>/manifest.json        written last; outputs are only valid once it exists

A request may name its own output prefix (`output_uri`); outputs and manifest then go to
``<output_uri>jobs/<job-id>/`` while the record, control objects and checkpoints stay under the jobs prefix, so
that any replica finds a job from its name alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryostack.errors import InvalidArgumentError, NotFoundError
from cryostack.io.objectstore import ObjectStore
from cryostack.io.uri import S3Uri
from cryostack.runtime.records import JobRecord, job_name

STATUS_FILE = "status.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINTS_DIR = "checkpoints/"
CONTROL_DIR = "control/"
_RESERVED = (STATUS_FILE, MANIFEST_FILE)
_RESERVED_DIRS = (CHECKPOINTS_DIR, CONTROL_DIR)


@dataclass(frozen=True)
class OutputObject:
    """One output of a job, as listed in its manifest."""

    path: str
    uri: str
    size_bytes: int
    sha256: str


class JobStore:
    """Reads and writes job records, checkpoints, outputs and manifests under one jobs prefix."""

    def __init__(self, objects: ObjectStore, jobs_uri: str) -> None:
        self.objects = objects
        self._root = S3Uri.parse(jobs_uri.rstrip("/") + "/", "jobs_uri")

    def uri(self, job_id: str, relpath: str = "") -> str:
        """The URI of `relpath` inside the job's folder (the folder itself, with a trailing '/', when empty)."""
        return str(self._root.join(job_id, relpath) if relpath else self._root.join(f"{job_id}/"))

    def outputs_uri(self, job_id: str, output_prefix: str = "") -> str:
        """The job's output folder: "<output_prefix>jobs/<job-id>/", or its state folder when no prefix is given."""
        if not output_prefix:
            return self.uri(job_id)
        return str(S3Uri.parse(output_prefix, "output_uri").join(f"jobs/{job_id}/"))

    def create(self, record: JobRecord) -> bool:
        """Write a new record unless one exists; True when this call created it."""
        return self.objects.put_if_absent(self.uri(record.job_id, STATUS_FILE), record.to_json())

    def read(self, job_id: str) -> JobRecord:
        """The stored record of a job; NOT_FOUND when there is none."""
        try:
            return JobRecord.from_json(self.objects.get_bytes(self.uri(job_id, STATUS_FILE)))
        except NotFoundError:
            raise NotFoundError(job_name(job_id), "no such job") from None

    def read_optional(self, job_id: str) -> JobRecord | None:
        """The stored record of a job, or None."""
        try:
            return self.read(job_id)
        except NotFoundError:
            return None

    def write(self, record: JobRecord) -> None:
        """Replace the stored record."""
        self.objects.put_bytes(self.uri(record.job_id, STATUS_FILE), record.to_json())

    def claim_attempt(self, job_id: str, attempt: int, owner: str) -> bool:
        """Claim the `attempt`-th run of a job for `owner`; only the first claimant gets True."""
        claim = json.dumps({"owner": owner}).encode()
        return self.objects.put_if_absent(self.uri(job_id, f"{CONTROL_DIR}attempt-{attempt}"), claim)

    def request_cancel(self, job_id: str) -> None:
        """Leave the cancellation marker the owning replica polls for."""
        self.objects.put_bytes(self.uri(job_id, f"{CONTROL_DIR}cancel"), b"")

    def cancel_requested(self, job_id: str) -> bool:
        """True when a cancellation marker exists."""
        return self.objects.exists(self.uri(job_id, f"{CONTROL_DIR}cancel"))

    def clear_cancel(self, job_id: str) -> None:
        """Remove the cancellation marker (before a cancelled job is run again)."""
        self.objects.delete(self.uri(job_id, f"{CONTROL_DIR}cancel"))

    def save_checkpoint(self, job_id: str, name: str, data: bytes) -> None:
        """Store (replace) a named checkpoint."""
        self.objects.put_bytes(self.uri(job_id, CHECKPOINTS_DIR + name), data)

    def load_checkpoint(self, job_id: str, name: str) -> bytes | None:
        """A named checkpoint, or None when it was never saved."""
        try:
            return self.objects.get_bytes(self.uri(job_id, CHECKPOINTS_DIR + name))
        except NotFoundError:
            return None

    def output_uri(self, outputs_uri: str, relpath: str) -> str:
        """The URI of the output at `relpath` in the output folder `outputs_uri`; reserved names are refused."""
        if not relpath or relpath in _RESERVED or relpath.startswith(_RESERVED_DIRS):
            raise InvalidArgumentError("output path", f"{relpath!r} is empty or reserved for the job's own state")
        return str(S3Uri.parse(outputs_uri).join(relpath).require_object("output path"))

    def write_output(self, outputs_uri: str, relpath: str, data: bytes) -> OutputObject:
        """Store one output and return its manifest entry."""
        uri = self.output_uri(outputs_uri, relpath)
        self.objects.put_bytes(uri, data)
        return OutputObject(relpath, uri, len(data), hashlib.sha256(data).hexdigest())

    def list_outputs(self, outputs_uri: str) -> list[str]:
        """Paths (relative to the output folder) of every output present, excluding the job's own state."""
        paths = []
        for uri in self._list_uris(outputs_uri):
            relpath = uri[len(outputs_uri) :]
            if relpath and relpath not in _RESERVED and not relpath.startswith(_RESERVED_DIRS):
                paths.append(relpath)
        return sorted(paths)

    def describe_output(self, outputs_uri: str, relpath: str) -> OutputObject:
        """The manifest entry of an output already in the store (read back to checksum it)."""
        uri = self.output_uri(outputs_uri, relpath)
        data = self.objects.get_bytes(uri)
        return OutputObject(relpath, uri, len(data), hashlib.sha256(data).hexdigest())

    def write_manifest(self, outputs_uri: str, manifest: dict[str, Any]) -> str:
        """Write `manifest.json` (the step that publishes the outputs) and return its URI."""
        uri = str(S3Uri.parse(outputs_uri).join(MANIFEST_FILE))
        self.objects.put_bytes(uri, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return uri

    def iter_records(self) -> Iterator[JobRecord]:
        """Every job record under the jobs prefix (records deleted meanwhile are skipped)."""
        root = str(self._root)
        for uri in self._list_uris(root):
            relpath = uri[len(root) :]
            job_id, _, rest = relpath.partition("/")
            if rest == STATUS_FILE:
                record = self.read_optional(job_id)
                if record is not None:
                    yield record

    def _list_uris(self, prefix: str) -> Iterator[str]:
        for info in self.objects.list(prefix):
            yield str(info.uri)
