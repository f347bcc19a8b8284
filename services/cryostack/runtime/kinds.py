"""A job kind: what a stage registers with the runner (request type, validation, the job function)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from google.protobuf.message import Message

if TYPE_CHECKING:
    from cryostack.runtime.context import JobContext

RequestT = TypeVar("RequestT", bound=Message)

_S3_SCHEME = "s3://"


def _accept(request: Message) -> None:
    """Validation that accepts every request."""


def _string_field(request: Message, name: str) -> str:
    """The value of a string field when the request type has it, else ''."""
    return str(getattr(request, name)) if name in request.DESCRIPTOR.fields_by_name else ""


def idempotency_key_field(request: Message) -> str:
    """The request's `idempotency_key` field ('' when it has none)."""
    return _string_field(request, "idempotency_key")


def output_uri_field(request: Message) -> str:
    """The request's `output_uri` field: the prefix under which the job's folder `jobs/<job-id>/` goes."""
    return _string_field(request, "output_uri")


def random_seed_field(request: Message) -> int | None:
    """The request's `random_seed` field; None (derive one from the job id) when it is unset or absent."""
    descriptor = request.DESCRIPTOR.fields_by_name.get("random_seed")
    if descriptor is None or (descriptor.has_presence and not request.HasField("random_seed")):
        return None
    return int(request.random_seed) or None  # type: ignore[attr-defined]


def s3_uris_in(request: Message) -> list[str]:
    """Every s3:// URI in the request's string fields (any depth, repeated included) except output prefixes."""
    found: list[str] = []

    def visit(message: Message) -> None:
        for descriptor, value in message.ListFields():
            if descriptor.name.endswith("output_uri"):
                continue
            values = value if descriptor.is_repeated else [value]
            if descriptor.message_type is not None and not descriptor.message_type.GetOptions().map_entry:
                for item in values:
                    visit(item)
            elif descriptor.message_type is not None:
                continue
            else:
                found.extend(v for v in values if isinstance(v, str) and v.startswith(_S3_SCHEME))

    visit(request)
    return found


@dataclass(frozen=True)
class JobKind(Generic[RequestT]):
    """One kind of job a service runs.

    `validate(request)` raises `InvalidArgumentError` (or `NotFoundError`) before anything is written;
    `run(context, request)` does the work and returns the typed result message, which the job's `result`
    carries as a `google.protobuf.Any`. By default the idempotency key, output prefix and random seed are read
    from the request's `idempotency_key`, `output_uri` and `random_seed` fields, and the input URIs (for the
    manifest) are its other s3:// string fields. An empty output prefix puts outputs beside the job's state.
    """

    name: str
    service: str
    request_type: type[RequestT]
    run: Callable[[JobContext, RequestT], Message]
    validate: Callable[[RequestT], None] = _accept
    idempotency_key: Callable[[RequestT], str] = idempotency_key_field
    output_prefix: Callable[[RequestT], str] = output_uri_field
    random_seed: Callable[[RequestT], int | None] = random_seed_field
    input_uris: Callable[[RequestT], list[str]] = s3_uris_in
