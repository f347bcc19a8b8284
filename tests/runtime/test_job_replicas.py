"""Replicas as separate server processes sharing one job store: any replica answers for any job, a job whose
replica was killed resumes elsewhere from its checkpoint, and SIGTERM turns health NOT_SERVING before stopping."""

from __future__ import annotations

import json
import signal
import time

import grpc
import pytest
from counting_job import SUBMIT_METHOD, count_request
from grpc_health.v1 import health_pb2, health_pb2_grpc
from runtime_helpers import expected_total, result_of, wait_for

from cryostack.jobs.v1 import jobs_pb2
from cryostack.runtime.client import JobClient, JobInterruptedError

S = jobs_pb2.JobState


def test_a_second_replica_answers_get_watch_and_cancel_for_the_first_ones_jobs(start_replica):
    first, second = start_replica(), start_replica()
    with JobClient(first.address) as on_first, JobClient(second.address) as on_second:
        job = on_first.submit(SUBMIT_METHOD, count_request("shared", 12, step_s=0.05))
        watched = list(on_second.watch(job.name, timeout_s=30))
        assert watched[-1].state == S.JOB_STATE_SUCCEEDED
        assert any(event.state == S.JOB_STATE_RUNNING for event in watched)
        assert on_second.get(job.name) == on_first.get(job.name)
        assert result_of(watched[-1])["total"] == expected_total(12, watched[-1].random_seed)
        assert [listed.name for listed in on_second.list()] == [job.name]

        long_job = on_first.submit(SUBMIT_METHOD, count_request("cancel-elsewhere", 500, step_s=0.02))
        wait_for(lambda: on_second.get(long_job.name).progress.iteration >= 2)
        assert on_second.cancel(long_job.name).cancel_requested
        final = on_second.wait(long_job.name, timeout_s=30)
        assert final.state == S.JOB_STATE_CANCELLED and final.progress.iteration < 500


def test_a_job_killed_with_its_replica_resumes_from_its_checkpoint_elsewhere(start_replica, object_store):
    steps = 40
    first, second = start_replica(), start_replica()
    interrupted = count_request("killed", steps, step_s=0.05, seed=77)
    uninterrupted = count_request("reference", steps, seed=77)
    with JobClient(first.address) as on_first, JobClient(second.address) as on_second:
        job = on_first.submit(SUBMIT_METHOD, interrupted)
        wait_for(lambda: on_second.get(job.name).progress.iteration >= 10, timeout_s=30)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait()

        # Once the dead replica's lease expires the job shows as interrupted, and watching it says so.
        stalled = wait_for(lambda: (seen := on_second.get(job.name)).interrupted and seen, timeout_s=15)
        assert stalled.state == S.JOB_STATE_RUNNING and stalled.attempt == 1
        with pytest.raises(JobInterruptedError):
            on_second.wait(job.name, timeout_s=30)

        resumed = on_second.submit(SUBMIT_METHOD, interrupted)
        assert resumed.name == job.name and resumed.attempt == 2 and not resumed.interrupted
        final = on_second.wait(job.name, timeout_s=60)
        reference = on_second.wait(on_second.submit(SUBMIT_METHOD, uninterrupted).name, timeout_s=60)

    assert final.state == S.JOB_STATE_SUCCEEDED and reference.state == S.JOB_STATE_SUCCEEDED
    assert result_of(final)["resumed_from_step"] >= 10 and result_of(final)["attempt"] == 2
    assert result_of(reference)["resumed_from_step"] == 0
    assert result_of(final)["total"] == result_of(reference)["total"] == expected_total(steps, 77)
    manifests = [json.loads(object_store.get_bytes(j.manifest_uri)) for j in (final, reference)]
    checksums = [{entry["path"]: entry["sha256"] for entry in manifest["outputs"]} for manifest in manifests]
    assert checksums[0] == checksums[1] and "counts.json" in checksums[0]


def test_sigterm_turns_health_not_serving_and_releases_the_running_job(start_replica):
    first, second = start_replica(), start_replica()
    request = count_request("drained", 400, step_s=0.02)
    with grpc.insecure_channel(first.address) as channel, JobClient(first.address) as on_first:
        job = on_first.submit(SUBMIT_METHOD, request)
        wait_for(lambda: on_first.get(job.name).progress.iteration >= 2)
        statuses = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
        first.process.send_signal(signal.SIGTERM)
        assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert first.process.wait(timeout=30) == 0

    with JobClient(second.address) as on_second:
        released = on_second.get(job.name)
        assert released.state == S.JOB_STATE_RUNNING and released.interrupted
        with pytest.raises(JobInterruptedError):
            list(on_second.watch(job.name, timeout_s=30))
        started = time.monotonic()
        resumed = on_second.submit(SUBMIT_METHOD, request)  # no lease to wait for: the replica released it
        assert resumed.attempt == 2 and time.monotonic() - started < 5
        on_second.cancel(job.name)
        assert on_second.wait(job.name, timeout_s=30).state == S.JOB_STATE_CANCELLED
