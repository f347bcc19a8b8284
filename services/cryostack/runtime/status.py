"""The one mapping from cryostack's domain errors to gRPC status codes, used by RPCs and by failed jobs alike."""

from __future__ import annotations

import logging
import uuid

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from cryostack.errors import (
    CancelledError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)

_CODES: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidArgumentError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (CancelledError, grpc.StatusCode.CANCELLED),
)


def rpc_status_for(error: BaseException, logger: logging.Logger, what: str) -> status_pb2.Status:
    """The google.rpc.Status for an exception; unexpected ones are logged with their traceback and told apart
    from domain errors by a generic INTERNAL message that only names an incident id to find in the log."""
    for error_type, code in _CODES:
        if isinstance(error, error_type):
            status = status_pb2.Status(code=code.value[0], message=str(error) or code.name.lower())
            if isinstance(error, InvalidArgumentError):
                violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.reason)
                detail = any_pb2.Any()
                detail.Pack(error_details_pb2.BadRequest(field_violations=[violation]))
                status.details.append(detail)
            return status
    incident = uuid.uuid4().hex[:12]
    logger.error("%s failed unexpectedly (incident %s)", what, incident, exc_info=error)
    return status_pb2.Status(
        code=grpc.StatusCode.INTERNAL.value[0], message=f"internal error (incident {incident}; see the server log)"
    )


def grpc_code(status: status_pb2.Status) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Status code number."""
    for code in grpc.StatusCode:
        if code.value[0] == status.code:
            return code
    return grpc.StatusCode.UNKNOWN
