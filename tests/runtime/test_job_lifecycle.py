"""Job API over real gRPC on loopback with job state in the real object store: submit, watch, get, cancel, list,
idempotency, bounded queue, failures and manifests."""

from __future__ import annotations

import hashlib
import json

import grpc
import pytest
from counting_job import SUBMIT_METHOD, count_request
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from runtime_helpers import expected_total, result_of, wait_for

from cryostack.jobs.v1 import jobs_pb2, jobs_pb2_grpc
from cryostack.runtime.records import job_id_for

S = jobs_pb2.JobState


def test_submit_watch_get_reach_succeeded_with_the_typed_result(start_server):
    local = start_server()
    job = local.client.submit(SUBMIT_METHOD, count_request("lifecycle", 6, step_s=0.02))
    assert job.name.startswith("jobs/") and job.state == S.JOB_STATE_QUEUED and not job.done

    events = list(local.client.watch(job.name, timeout_s=30))
    states = [event.state for event in events]
    assert states[-1] == S.JOB_STATE_SUCCEEDED and events[-1].done
    assert S.JOB_STATE_RUNNING in states
    iterations = [event.progress.iteration for event in events if event.state == S.JOB_STATE_RUNNING]
    assert iterations == sorted(iterations) and iterations[-1] == 6
    assert any(event.progress.total_iterations == 6 and 0 < event.progress.fraction < 1 for event in events)

    final = local.client.get(job.name)
    assert final.state == S.JOB_STATE_SUCCEEDED and not final.HasField("error")
    assert result_of(final)["total"] == expected_total(6, final.random_seed)
    assert final.backend == "numpy" and final.device == "cpu" and final.attempt == 1
    assert final.outputs_uri == local.store.outputs_uri(final.name.removeprefix("jobs/"))
    assert final.start_time.ToNanoseconds() <= final.end_time.ToNanoseconds()


def test_same_key_returns_the_same_job_and_different_parameters_are_refused(start_server):
    local = start_server()
    first = local.client.submit(SUBMIT_METHOD, count_request("same-key", 20, step_s=0.02))
    again_running = local.client.submit(SUBMIT_METHOD, count_request("same-key", 20, step_s=0.02))
    assert again_running.name == first.name
    finished = local.client.wait(first.name, timeout_s=30)
    again_done = local.client.submit(SUBMIT_METHOD, count_request("same-key", 20, step_s=0.02))
    assert again_done.name == first.name and again_done.state == S.JOB_STATE_SUCCEEDED
    assert again_done.end_time == finished.end_time and again_done.attempt == 1

    with pytest.raises(grpc.RpcError) as caught:
        local.client.submit(SUBMIT_METHOD, count_request("same-key", 21))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in caught.value.details() and first.name in caught.value.details()


def test_a_late_watcher_first_gets_the_current_state(start_server):
    local = start_server()
    job = local.client.submit(SUBMIT_METHOD, count_request("late", 40, step_s=0.02))
    wait_for(lambda: local.client.get(job.name).progress.iteration >= 10)
    first_seen = next(iter(local.client.watch(job.name, timeout_s=30)))
    assert first_seen.state == S.JOB_STATE_RUNNING and first_seen.progress.iteration >= 10

    done = local.client.wait(job.name, timeout_s=30)
    after_the_end = list(local.client.watch(job.name, timeout_s=30))
    assert len(after_the_end) == 1 and after_the_end[0] == done


def test_cancel_stops_a_running_job_without_publishing_outputs(start_server, object_store):
    local = start_server()
    job = local.client.submit(SUBMIT_METHOD, count_request("cancel", 500, step_s=0.02))
    wait_for(lambda: local.client.get(job.name).progress.iteration >= 3)
    requested = local.client.cancel(job.name)
    assert requested.cancel_requested or requested.state == S.JOB_STATE_CANCELLED

    final = local.client.wait(job.name, timeout_s=30)
    assert final.state == S.JOB_STATE_CANCELLED and final.done
    assert final.error.code == grpc.StatusCode.CANCELLED.value[0]
    assert final.progress.iteration < 500 and not final.manifest_uri
    assert not object_store.exists(final.outputs_uri + "manifest.json")
    assert local.client.cancel(job.name) == final  # cancelling a finished job changes nothing


def test_a_full_queue_is_resource_exhausted_and_writes_nothing(start_server, job_store):
    local = start_server(max_workers=1, max_queued_jobs=1)
    running = local.client.submit(SUBMIT_METHOD, count_request("busy-1", 500, step_s=0.02))
    queued = local.client.submit(SUBMIT_METHOD, count_request("busy-2", 500, step_s=0.02))
    assert queued.state == S.JOB_STATE_QUEUED

    stub_submit = local.client.channel.unary_unary(
        SUBMIT_METHOD,
        request_serializer=struct_pb2.Struct.SerializeToString,
        response_deserializer=jobs_pb2.Job.FromString,
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub_submit(count_request("busy-3", 5), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert job_store.read_optional(job_id_for("counting", "busy-3")) is None

    # Resubmitting a job that is already here is not new work and is answered even when full.
    assert local.client.submit(SUBMIT_METHOD, count_request("busy-2", 500, step_s=0.02)).name == queued.name
    cancelled_while_queued = local.client.cancel(queued.name)
    assert cancelled_while_queued.state == S.JOB_STATE_CANCELLED
    local.client.cancel(running.name)
    assert local.client.wait(running.name, timeout_s=30).state == S.JOB_STATE_CANCELLED
    assert local.client.submit(SUBMIT_METHOD, count_request("busy-3", 5)).state == S.JOB_STATE_QUEUED


def test_manifest_is_written_last_and_lists_every_output_with_its_checksum(start_server, object_store):
    local = start_server()
    request = count_request("manifest", 5, seed=1234, input_uri="s3://some-bucket/particles.star")
    job = local.client.wait(local.client.submit(SUBMIT_METHOD, request).name, timeout_s=30)
    assert job.state == S.JOB_STATE_SUCCEEDED and job.random_seed == 1234
    assert job.manifest_uri == job.outputs_uri + "manifest.json"

    manifest = json.loads(object_store.get_bytes(job.manifest_uri))
    listed = {entry["path"]: entry for entry in manifest["outputs"]}
    assert set(listed) == {"counts.json", "report/summary.txt"}  # state, checkpoints, control are not outputs
    manifest_time = object_store.stat(job.manifest_uri).last_modified
    for path, entry in listed.items():
        data = object_store.get_bytes(job.outputs_uri + path)
        assert entry["uri"] == job.outputs_uri + path
        assert entry["size_bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert object_store.stat(entry["uri"]).last_modified <= manifest_time
    assert json.loads(object_store.get_bytes(job.outputs_uri + "counts.json"))["total"] == expected_total(5, 1234)
    assert manifest["random_seed"] == 1234 and manifest["job"] == job.name
    assert manifest["parameters"]["value"]["steps"] == 5
    assert manifest["input_uris"] == ["s3://some-bucket/particles.star"]
    assert manifest["backend"] == "numpy" and manifest["software"]["cryostack-services"]
    assert manifest["result"]["value"]["total"] == expected_total(5, 1234)


def test_a_failed_job_has_no_manifest_even_with_outputs_written(start_server, object_store):
    local = start_server()
    job = local.client.submit(SUBMIT_METHOD, count_request("fails", 6, run_error="invalid"))
    final = local.client.wait(job.name, timeout_s=30)
    assert final.state == S.JOB_STATE_FAILED
    assert final.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert final.error.message == "steps: must be between 1 and 10000"
    assert not final.manifest_uri and not object_store.exists(final.outputs_uri + "manifest.json")


def test_an_unexpected_failure_is_internal_without_details(start_server):
    local = start_server()
    final = local.client.wait(
        local.client.submit(SUBMIT_METHOD, count_request("crashes", 6, run_error="internal")).name, timeout_s=30
    )
    assert final.state == S.JOB_STATE_FAILED and final.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "secret" not in final.error.message and "/srv" not in final.error.message
    assert final.error.message.startswith("internal error")


def test_outputs_go_under_the_requested_output_prefix(start_server, object_store, bucket):
    local = start_server()
    prefix = f"s3://{bucket}/results/"
    job = local.client.wait(
        local.client.submit(SUBMIT_METHOD, count_request("prefixed", 3, output_uri=prefix)).name, timeout_s=30
    )
    job_id = job.name.removeprefix("jobs/")
    assert job.outputs_uri == f"{prefix}jobs/{job_id}/"
    assert object_store.exists(job.outputs_uri + "counts.json") and object_store.exists(job.manifest_uri)
    assert object_store.exists(local.store.uri(job_id, "status.json"))


def test_list_filters_by_service_and_state_and_pages(start_server):
    local = start_server()
    names = [local.client.submit(SUBMIT_METHOD, count_request(f"list-{i}", 2)).name for i in range(3)]
    for name in names:
        local.client.wait(name, timeout_s=30)
    stub = jobs_pb2_grpc.JobServiceStub(local.client.channel)
    first = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=2))
    second = stub.ListJobs(jobs_pb2.ListJobsRequest(page_size=2, page_token=first.next_page_token))
    assert len(first.jobs) == 2 and first.next_page_token and len(second.jobs) == 1 and not second.next_page_token
    assert {job.name for job in [*first.jobs, *second.jobs]} == set(names)
    assert [job.name for job in local.client.list(page_size=1)] == [job.name for job in [*first.jobs, *second.jobs]]
    assert len(list(local.client.list(service="counting", states=[S.JOB_STATE_SUCCEEDED]))) == 3
    assert list(local.client.list(service="classify2d")) == []
    assert list(local.client.list(states=[S.JOB_STATE_FAILED])) == []


def test_get_of_an_unknown_or_malformed_name(start_server):
    local = start_server()
    with pytest.raises(grpc.RpcError) as missing:
        local.client.get("jobs/" + "0" * 32)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as malformed:
        local.client.get("jobs/../../etc")
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = error_details_pb2.BadRequest()
    status = rpc_status.from_call(malformed.value)
    assert status.details[0].Unpack(violations) and violations.field_violations[0].field == "name"
