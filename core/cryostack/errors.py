"""Domain errors shared by every cryostack layer; the gRPC adapter maps each to one status code."""

from __future__ import annotations


class CryostackError(Exception):
    """Base class of every error cryostack raises on purpose."""


class InvalidArgumentError(CryostackError):
    """A request, parameter or input object is invalid; names the field or object and the reason."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class NotFoundError(CryostackError):
    """A named object (an S3 key, a job) does not exist."""

    def __init__(self, name: str, reason: str = "not found") -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


class PermissionDeniedError(CryostackError):
    """A dependency (the object store) refused this service's credentials or access to a named object."""


class ResourceExhaustedError(CryostackError):
    """A bounded resource (worker pool, queue) is full; the client should back off and retry."""


class UnavailableError(CryostackError):
    """A dependency (the object store) stayed unreachable after retries."""


class CancelledError(CryostackError):
    """A job was cancelled while it ran; raised from its cooperative cancellation checks."""
