"""What a running job sees: progress reporting, cancellation checks, checkpoints and outputs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from cryostack.errors import CancelledError
from cryostack.io.objectstore import ObjectStore

if TYPE_CHECKING:
    from cryostack.runtime.runner import ActiveJob


class JobContext:
    """Handed to a job function; every method is safe to call from the job's worker thread."""

    def __init__(self, active: ActiveJob, objects: ObjectStore, logger: logging.Logger) -> None:
        self._active = active
        self.objects = objects
        self.logger = logger

    @property
    def job_name(self) -> str:
        """The job's resource name, "jobs/<job-id>"."""
        return self._active.record.job.name

    @property
    def outputs_uri(self) -> str:
        """The job's folder, "s3://.../jobs/<job-id>/"."""
        return self._active.record.job.outputs_uri

    @property
    def seed(self) -> int:
        """Seed for the job's random number generators; the same on every attempt of the job."""
        return self._active.record.job.random_seed

    @property
    def attempt(self) -> int:
        """1 on the first run; higher when the job resumed after its replica stopped."""
        return self._active.record.job.attempt

    def report_progress(
        self,
        *,
        stage: str | None = None,
        iteration: int | None = None,
        total_iterations: int | None = None,
        fraction: float | None = None,
        current_resolution_a: float | None = None,
        message: str | None = None,
        summary: Mapping[str, float] | None = None,
    ) -> None:
        """Update the fields given (others keep their value); watchers see it at once, the store soon after."""
        self._active.update_progress(
            stage=stage,
            iteration=iteration,
            total_iterations=total_iterations,
            fraction=fraction,
            current_resolution_a=current_resolution_a,
            message=message,
            summary=summary,
        )

    def cancel_requested(self) -> bool:
        """True once cancellation was requested here or on any replica (or this replica is stopping)."""
        return self._active.should_stop()

    def check_cancelled(self) -> None:
        """Raise `CancelledError` when the job should stop; call it between units of work."""
        if self._active.should_stop():
            raise CancelledError(f"{self.job_name} was cancelled")

    def save_checkpoint(self, name: str, data: bytes) -> None:
        """Store (replace) the checkpoint `name`; a resumed attempt reads it back with `load_checkpoint`."""
        self._active.store.save_checkpoint(self._active.job_id, name, data)

    def load_checkpoint(self, name: str) -> bytes | None:
        """The checkpoint `name` saved by this or an earlier attempt, or None."""
        return self._active.store.load_checkpoint(self._active.job_id, name)

    def output_uri(self, relpath: str) -> str:
        """Where the output at `relpath` lives, for writers that stream to the store themselves."""
        return self._active.store.output_uri(self.outputs_uri, relpath)

    def write_output(self, relpath: str, data: bytes) -> str:
        """Store one output (relative to the job folder) and return its URI; it is published by the manifest."""
        output = self._active.store.write_output(self.outputs_uri, relpath, data)
        self._active.outputs[output.path] = output
        return output.uri
