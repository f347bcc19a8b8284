"""A job kind for testing the runtime: counts steps, checkpointing after each, and writes two outputs.

The request is a `google.protobuf.Struct` served through a generic method handler, so the tests need no proto of
their own. Fields: `idempotency_key`, `steps` (1..10000), `step_s` (sleep per step), `output_uri` (optional
prefix), `seed` and `input_uri` (optional), `validate_error` (raise this kind of error in validation) and
`run_error` (raise it in the job).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

import grpc
from google.protobuf import struct_pb2

from cryostack.errors import (
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
)
from cryostack.jobs.v1 import jobs_pb2
from cryostack.runtime import JobContext, JobKind, JobRunner

SERVICE = "cryostack.testing.v1.CountingService"
SUBMIT_METHOD = f"/{SERVICE}/SubmitCount"
CHECKPOINT = "state.json"
MAX_STEPS = 10_000


def make_error(kind: str) -> Exception:
    """The exception a request asks to be raised."""
    errors: dict[str, Exception] = {
        "invalid": InvalidArgumentError("steps", "must be between 1 and 10000"),
        "not_found": NotFoundError("s3://bucket/missing.star"),
        "permission_denied": PermissionDeniedError("s3://bucket/particles.star: AccessDenied"),
        "resource_exhausted": ResourceExhaustedError("too many particles for this replica"),
        "unavailable": UnavailableError("object store unreachable after 5 attempts"),
        "internal": RuntimeError("secret-internal-detail at /srv/private/path"),
    }
    return errors[kind]


def validate(request: struct_pb2.Struct) -> None:
    """Reject bad step counts (and raise on request, to exercise the error mapping)."""
    if "validate_error" in request:
        raise make_error(request["validate_error"])
    steps = request["steps"] if "steps" in request else 0  # noqa: SIM401  (Struct has no .get)
    if not (1 <= steps <= MAX_STEPS) or steps != int(steps):
        raise InvalidArgumentError("steps", f"must be an integer between 1 and {MAX_STEPS}, got {steps}")


def next_total(total: int, step: int, seed: int) -> int:
    """One step of the count: a seeded linear congruential update, so outputs depend on every step and the seed."""
    return (total * 1_103_515_245 + step + seed) % 2**31


def run(context: JobContext, request: struct_pb2.Struct) -> struct_pb2.Struct:
    """Count `steps` steps from the last checkpoint, then write the outputs."""
    steps = int(request["steps"])
    step_s = float(request["step_s"]) if "step_s" in request else 0.0
    state = json.loads(context.load_checkpoint(CHECKPOINT) or b'{"step": 0, "total": 0}')
    first_step = state["step"]
    for step in range(first_step, steps):
        context.check_cancelled()
        if "run_error" in request and step == steps // 2:
            raise make_error(request["run_error"])
        time.sleep(step_s)
        state = {"step": step + 1, "total": next_total(state["total"], step, context.seed % 2**31)}
        context.save_checkpoint(CHECKPOINT, json.dumps(state).encode())
        context.report_progress(
            stage="count",
            iteration=step + 1,
            total_iterations=steps,
            fraction=(step + 1) / steps,
            message=f"step {step + 1} of {steps}",
            summary={"total": float(state["total"])},
        )
    context.write_output("counts.json", json.dumps({"steps": steps, "total": state["total"]}).encode())
    context.write_output("report/summary.txt", f"{steps} steps, total {state['total']}\n".encode())
    result = struct_pb2.Struct()
    result.update({"total": state["total"], "resumed_from_step": first_step, "attempt": context.attempt})
    return result


KIND = JobKind(
    name="counting",
    service="counting",
    request_type=struct_pb2.Struct,
    run=run,
    validate=validate,
    idempotency_key=lambda r: r["idempotency_key"] if "idempotency_key" in r else "",  # noqa: SIM401
    output_prefix=lambda r: r["output_uri"] if "output_uri" in r else "",  # noqa: SIM401
    random_seed=lambda r: int(r["seed"]) if "seed" in r else None,
    input_uris=lambda r: [r["input_uri"]] if "input_uri" in r else [],
)


def register(server: grpc.Server, runner: JobRunner) -> Iterable[str]:
    """Add the counting service (one Submit RPC taking a Struct) to a server."""
    runner.register(KIND)
    submit = grpc.unary_unary_rpc_method_handler(
        lambda request, context: runner.submit(KIND.name, request),
        request_deserializer=struct_pb2.Struct.FromString,
        response_serializer=jobs_pb2.Job.SerializeToString,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"SubmitCount": submit}),))
    return [SERVICE]


def count_request(key: str, steps: int, **fields: object) -> struct_pb2.Struct:
    """A Struct request for the counting job."""
    request = struct_pb2.Struct()
    request.update({"idempotency_key": key, "steps": steps, **fields})
    return request
