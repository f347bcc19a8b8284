"""The abinitio service over real gRPC on loopback with a real SeaweedFS store: K = 1, 3 and 6 jobs running at
the same time, bad requests refused before anything is written, and an interrupted job resumed on another replica
ending equal to an uninterrupted one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from threadpoolctl import threadpool_info

from cryostack.abinitio.v1 import abinitio_pb2
from cryostack.config import ServiceSettings
from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario
from cryostack.io.dataset import write_simulated_dataset
from cryostack.io.mrc import read_mrc
from cryostack.io.objectstore import ObjectStore
from cryostack.io.star import read_star
from cryostack.jobs.v1 import jobs_pb2
from cryostack.particles.v1 import particles_pb2
from cryostack.runtime import CryostackServer, JobRunner, JobStore, create_server
from cryostack.runtime.client import JobClient, submit_method
from cryostack.services.abinitio.servicer import BlasShare, register

SUBMIT = submit_method(abinitio_pb2, "AbinitioService", "SubmitAbinitio")
N_PARTICLES = 180
BOX_PX = 32
PIXEL_SIZE_A = 6.0  # Nyquist 12 Å
RUNNER_TIMINGS = {"lease_s": 1.5, "cancel_poll_s": 0.2, "progress_write_s": 0.2}
# A few short iterations at 24 Å: these tests check the service, the algorithm's quality is tested elsewhere.
FAST = {"initial_iterations": 4, "final_iterations": 2, "minibatch_size_initial": 40, "minibatch_size_final": 60,
        "max_resolution_a": 24.0}


@pytest.fixture
def particles_uri(object_store: ObjectStore, bucket: str) -> str:
    """A small simulated three-state set (box 32, 6 Å/px) in the test's bucket."""
    params = SimulationParameters(n_particles=N_PARTICLES, box_px=BOX_PX, pixel_size_a=PIXEL_SIZE_A, snr=0.5, seed=7)
    dataset = write_simulated_dataset(ParticleSimulator(scenario("three-state"), params), f"s3://{bucket}/data",
                                      object_store)
    return dataset.particles_star


@pytest.fixture
def start_server(object_store: ObjectStore, bucket: str) -> Iterator[Callable[..., tuple[CryostackServer, JobClient]]]:
    """Start in-process abinitio replicas sharing the test bucket's job store."""
    started: list[tuple[CryostackServer, JobClient]] = []

    def start(max_workers: int = 1) -> tuple[CryostackServer, JobClient]:
        settings = ServiceSettings(jobs_uri=f"s3://{bucket}/jobs", max_workers=max_workers)
        runner = JobRunner(JobStore(object_store, settings.jobs_uri), settings, **RUNNER_TIMINGS)
        server, port = create_server(settings, runner, register)
        server.start()
        started.append((server, JobClient(f"127.0.0.1:{port}")))
        return started[-1]

    yield start
    for server, client in started:
        client.close()
        server.stop(0).wait()


def _request(key: str, particles_uri: str, output_uri: str, subset: int | None = None,
             **parameters: object) -> abinitio_pb2.SubmitAbinitioRequest:
    request = abinitio_pb2.SubmitAbinitioRequest(
        idempotency_key=key, particles_uri=particles_uri, output_uri=output_uri, random_seed=11,
        parameters=abinitio_pb2.AbinitioParameters(**{**FAST, **parameters}),
    )
    if subset is not None:
        request.subset.CopyFrom(particles_pb2.ParticleSubset(random=particles_pb2.RandomSubset(particle_count=subset,
                                                                                            seed=3)))
    return request


def test_jobs_with_one_three_and_six_classes_run_at_the_same_time(
    start_server: Callable, particles_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    _, client = start_server(max_workers=3)
    jobs = {k: client.submit(SUBMIT, _request(f"k{k}", particles_uri, f"s3://{bucket}/out", class_count=k))
            for k in (1, 3, 6)}
    progress: dict[int, list[jobs_pb2.Job]] = {}

    def follow(k: int) -> None:
        progress[k] = list(client.watch(jobs[k].name, timeout_s=600))

    watchers = [threading.Thread(target=follow, args=(k,)) for k in jobs]
    for watcher in watchers:
        watcher.start()
    for watcher in watchers:
        watcher.join()
    done = {k: client.get(job.name) for k, job in jobs.items()}

    for k, job in done.items():
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error.message
        iterations = [update.progress for update in progress[k] if update.progress.stage == "sgd"]
        assert max(p.iteration for p in iterations) == 6
        assert all(p.current_resolution_a >= 24.0 - 1e-6 for p in iterations)
        assert any(f"class_{k}_fraction" in p.summary and "objective" in p.summary for p in iterations)
    # Every job was running while each of the others was.
    starts = [job.start_time.ToDatetime() for job in done.values()]
    ends = [job.end_time.ToDatetime() for job in done.values()]
    assert max(starts) < min(ends)

    for k, job in done.items():
        result = abinitio_pb2.AbinitioResult()
        job.result.Unpack(result)
        assert result.particle_count == N_PARTICLES and result.final_resolution_a == 24.0
        assert [c.class_number for c in result.classes] == list(range(1, k + 1))
        counts = [c.particle_count for c in result.classes]
        assert sum(counts) == N_PARTICLES and counts == sorted(counts, reverse=True)
        assert abs(sum(c.occupancy_fraction for c in result.classes) - 1.0) < 1e-4
        volume = read_mrc(object_store, result.classes[0].volume_uri)
        assert volume.data.shape == (BOX_PX,) * 3
        assert volume.header.voxel_size_a == pytest.approx((PIXEL_SIZE_A,) * 3)
        particles = read_star(object_store, result.particles_uri)
        assert len(particles) == N_PARTICLES
        np.testing.assert_array_equal(np.bincount(particles.column("rlnClassNumber").astype(int),
                                                  minlength=k + 1)[1:], counts)
        for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
            assert np.all(np.isfinite(particles.column(column).astype(float)))
        probability = particles.column("rlnMaxValueProbDistribution").astype(float)
        assert np.all((probability >= 1.0 / k - 1e-6) & (probability <= 1.0 + 1e-6))
        assert object_store.get_bytes(result.report_png_uri)[:4] == b"\x89PNG"
        assert object_store.exists(result.manifest_uri)


@pytest.mark.parametrize(
    ("parameters", "subset", "field"),
    [
        ({"class_count": 0}, None, "parameters.class_count"),
        ({}, N_PARTICLES + 1, "subset"),
        ({"initial_resolution_a": 20.0, "max_resolution_a": 24.0}, None, "parameters.initial_resolution_a"),
        ({"max_resolution_a": 10.0}, None, "parameters.max_resolution_a"),
        ({"minibatch_size_initial": 80, "minibatch_size_final": 40}, None, "parameters.minibatch_size_final"),
    ],
)
def test_bad_parameters_are_invalid_argument_and_write_nothing(
    start_server: Callable, particles_uri: str, bucket: str, object_store: ObjectStore, parameters: dict,
    subset: int | None, field: str,
) -> None:
    _, client = start_server()
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(SUBMIT, _request("bad", particles_uri, f"s3://{bucket}/out", subset, **parameters))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    assert object_store.list(f"s3://{bucket}/jobs/") == []
    assert object_store.list(f"s3://{bucket}/out/") == []


def test_missing_particle_set_is_not_found(start_server: Callable, bucket: str, object_store: ObjectStore) -> None:
    _, client = start_server()
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(SUBMIT, _request("missing", f"s3://{bucket}/nowhere/particles.star", f"s3://{bucket}/out"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert object_store.list(f"s3://{bucket}/jobs/") == []


def test_interrupted_job_resumes_on_another_replica_and_ends_as_an_uninterrupted_one(
    start_server: Callable, particles_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    parameters = {"class_count": 2, "initial_iterations": 6, "final_iterations": 2}
    first_server, first_client = start_server()
    job = first_client.submit(SUBMIT, _request("resumed", particles_uri, f"s3://{bucket}/a", 120, **parameters))
    for update in first_client.watch(job.name, timeout_s=300):
        if update.progress.iteration >= 3:
            break
    # The replica stops mid-run (its job is left resumable); another replica takes the same request.
    stopper = threading.Thread(target=lambda: first_server.stop(5).wait())
    stopper.start()
    stopper.join()
    _, second_client = start_server()
    resumed = second_client.submit(SUBMIT, _request("resumed", particles_uri, f"s3://{bucket}/a", 120, **parameters))
    resumed = second_client.wait(resumed.name, timeout_s=300)
    reference = second_client.submit(SUBMIT, _request("reference", particles_uri, f"s3://{bucket}/b", 120,
                                                      **parameters))
    reference = second_client.wait(reference.name, timeout_s=300)

    assert resumed.state == reference.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert resumed.attempt >= 2
    results = []
    for job_done in (resumed, reference):
        result = abinitio_pb2.AbinitioResult()
        job_done.result.Unpack(result)
        results.append(result)
    # The STAR header records when it was written; its tables must match exactly.
    resumed_table, reference_table = (read_star(object_store, result.particles_uri) for result in results)
    assert resumed_table.particles.equals(reference_table.particles)
    for resumed_class, reference_class in zip(results[0].classes, results[1].classes, strict=True):
        assert object_store.get_bytes(resumed_class.volume_uri) == object_store.get_bytes(reference_class.volume_uri)


def test_blas_threads_are_shared_between_running_jobs() -> None:
    share = BlasShare(cores=2)

    def blas_threads() -> int:
        return min(info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas")

    with share.job():
        assert blas_threads() == 2
        with share.job():
            assert blas_threads() == 1
        assert blas_threads() == 2


def test_a_cancelled_job_stops_and_publishes_nothing(
    start_server: Callable, cancel_at_iteration: Callable, particles_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    _, client = start_server()
    job = client.submit(SUBMIT, _request("cancelled", particles_uri, f"s3://{bucket}/out", initial_iterations=200))
    job = cancel_at_iteration(client, job.name, 2)

    assert job.state == jobs_pb2.JOB_STATE_CANCELLED
    assert job.progress.iteration < 200
    assert not object_store.exists(f"{job.outputs_uri}manifest.json")
