"""The interceptors over real gRPC: each domain error maps to its status code, nothing unexpected leaks, and the
optional bearer token guards every service but health."""

from __future__ import annotations

import grpc
import pytest
from counting_job import SUBMIT_METHOD, count_request
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from pydantic import SecretStr

from cryostack.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from cryostack.runtime.records import job_id_for


def raw_submit(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()):
    """Submit without the client's retries, so every status is seen as the server sent it."""
    call = channel.unary_unary(
        SUBMIT_METHOD,
        request_serializer=struct_pb2.Struct.SerializeToString,
        response_deserializer=jobs_pb2.Job.FromString,
    )
    return lambda request: call(request, timeout=10, metadata=metadata)


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        ("invalid", grpc.StatusCode.INVALID_ARGUMENT, "steps: must be between 1 and 10000"),
        ("not_found", grpc.StatusCode.NOT_FOUND, "s3://bucket/missing.star: not found"),
        ("permission_denied", grpc.StatusCode.PERMISSION_DENIED, "s3://bucket/particles.star: AccessDenied"),
        ("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED, "too many particles for this replica"),
        ("unavailable", grpc.StatusCode.UNAVAILABLE, "object store unreachable after 5 attempts"),
    ],
)
def test_domain_errors_map_to_their_status_code(start_server, job_store, error, code, message):
    local = start_server()
    key = f"mapping-{error}"
    with pytest.raises(grpc.RpcError) as caught:
        raw_submit(local.client.channel)(count_request(key, 5, validate_error=error))
    assert caught.value.code() == code and caught.value.details() == message
    assert job_store.read_optional(job_id_for("counting", key)) is None  # validation fails before any write


def test_invalid_argument_carries_the_field_violation(start_server):
    local = start_server()
    with pytest.raises(grpc.RpcError) as caught:
        raw_submit(local.client.channel)(count_request("bad-steps", 0))
    status = rpc_status.from_call(caught.value)
    bad_request = error_details_pb2.BadRequest()
    assert status is not None and status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "steps"
    assert "between 1 and 10000" in bad_request.field_violations[0].description


def test_an_unexpected_error_is_internal_with_no_detail_leaked(start_server):
    local = start_server()
    with pytest.raises(grpc.RpcError) as caught:
        raw_submit(local.client.channel)(count_request("boom", 5, validate_error="internal"))
    details = caught.value.details()
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert details.startswith("internal error (incident ")
    assert "secret" not in details and "Traceback" not in details and "RuntimeError" not in details
    assert all("secret" not in value for _, value in (caught.value.trailing_metadata() or ()) if isinstance(value, str))


def test_bearer_token_is_required_except_for_health(start_server):
    local = start_server(auth_token=SecretStr("s3cr3t-token"))
    channel = grpc.insecure_channel(local.address)
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    try:
        for metadata in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cr3t-token"),)]:
            with pytest.raises(grpc.RpcError) as caught:
                jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                raw_submit(channel, metadata)(count_request("auth", 2))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED

        authorised = (("authorization", "Bearer s3cr3t-token"),)
        assert jobs.ListJobs(jobs_pb2.ListJobsRequest(), timeout=10, metadata=authorised).jobs == []
        assert raw_submit(channel, authorised)(count_request("auth", 2)).name.startswith("jobs/")
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
