"""The classify2d service over real gRPC on loopback with a real SeaweedFS store: a job end to end, bad requests,
and an interrupted job resumed on another replica ending equal to an uninterrupted one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pandas as pd
import pytest

from cryostack.classify2d.v1 import classify2d_pb2
from cryostack.config import ServiceSettings
from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario
from cryostack.io.dataset import write_simulated_dataset
from cryostack.io.mrc import read_mrc
from cryostack.io.objectstore import ObjectStore
from cryostack.io.star import ParticleTable, read_star, resolve_image_names, write_star
from cryostack.jobs.v1 import jobs_pb2
from cryostack.runtime import CryostackServer, JobRunner, JobStore, create_server
from cryostack.runtime.client import JobClient, submit_method
from cryostack.services.classify2d.servicer import register

SUBMIT = submit_method(classify2d_pb2, "Classify2DService", "SubmitClassify2D")
N_PARTICLES = 240
RUNNER_TIMINGS = {"lease_s": 1.5, "cancel_poll_s": 0.2, "progress_write_s": 0.2}


@pytest.fixture
def particles_uri(object_store: ObjectStore, bucket: str) -> str:
    """A small simulated floppy-protein set (box 32, 6 Å/px) in the test's bucket."""
    params = SimulationParameters(n_particles=N_PARTICLES, box_px=32, pixel_size_a=6.0, snr=0.5, seed=3)
    dataset = write_simulated_dataset(ParticleSimulator(scenario("floppy"), params), f"s3://{bucket}/data",
                                      object_store)
    return dataset.particles_star


@pytest.fixture
def start_server(object_store: ObjectStore, bucket: str) -> Iterator[Callable[[], tuple[CryostackServer, JobClient]]]:
    """Start in-process classify2d replicas sharing the test bucket's job store (keyword arguments: service limits)."""
    started: list[tuple[CryostackServer, JobClient]] = []

    def start(**limits: int) -> tuple[CryostackServer, JobClient]:
        settings = ServiceSettings(jobs_uri=f"s3://{bucket}/jobs", max_workers=1, **limits)
        runner = JobRunner(JobStore(object_store, settings.jobs_uri), settings, **RUNNER_TIMINGS)
        server, port = create_server(settings, runner, register)
        server.start()
        started.append((server, JobClient(f"127.0.0.1:{port}")))
        return started[-1]

    yield start
    for server, client in started:
        client.close()
        server.stop(0).wait()


def _request(
    key: str, particles_uri: str, output_uri: str, **parameters: object
) -> classify2d_pb2.SubmitClassify2DRequest:
    defaults = {"class_count": 3, "online_em_iterations": 3, "batch_size_per_class": 40, "max_resolution_a": 12.0}
    request = classify2d_pb2.SubmitClassify2DRequest(
        idempotency_key=key, particles_uri=particles_uri, output_uri=output_uri, random_seed=17,
        parameters=classify2d_pb2.Classify2DParameters(**{**defaults, **parameters}),
    )
    return request


def test_job_runs_through_grpc_and_writes_every_output(
    start_server: Callable, particles_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    _, client = start_server()
    request = _request("capped", particles_uri, f"s3://{bucket}/out", max_particles_per_class_mean_multiple=1.5)

    job = client.submit(SUBMIT, request)
    progress = [update.progress for update in client.watch(job.name, timeout_s=300)]
    job = client.get(job.name)

    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error.message
    assert max(p.iteration for p in progress) == 4  # 3 online + 1 full
    # Every iteration reports particles seen, the resolution and the occupancy summary; the last one the full pass.
    per_iteration = {p.iteration: p for p in progress if p.iteration > 0}
    seen = [per_iteration[i].summary["particles_seen"] for i in sorted(per_iteration)]
    assert seen == sorted(seen) and seen[-1] - seen[-2] == N_PARTICLES
    last = per_iteration[4]
    assert last.total_iterations == 4 and 12.0 <= last.current_resolution_a < 100.0
    assert {"classes_below_one_particle", "smallest_class", "largest_class"} <= set(last.summary)
    assert 0 <= last.summary["smallest_class"] <= last.summary["largest_class"] <= 120
    result = classify2d_pb2.Classify2DResult()
    job.result.Unpack(result)
    assert result.particle_count == N_PARTICLES
    assert result.max_particles_per_class_count == 120  # ceil(1.5 · 240 / 3)
    counts = [c.particle_count for c in result.classes]
    assert sum(counts) == N_PARTICLES and max(counts) <= 120 and counts == sorted(counts, reverse=True)
    assert result.empty_class_count == counts.count(0)

    particles = read_star(object_store, result.particles_uri)
    assert len(particles) == N_PARTICLES
    class_numbers = particles.column("rlnClassNumber").astype(int)
    np.testing.assert_array_equal(np.bincount(class_numbers, minlength=4)[1:], counts)
    for column in ("rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnMaxValueProbDistribution"):
        assert np.all(np.isfinite(particles.column(column).astype(float)))
    averages = read_mrc(object_store, result.class_averages_uri)
    assert averages.data.shape == (3, 32, 32)
    assert object_store.get_bytes(result.montage_png_uri)[:4] == b"\x89PNG"
    assert object_store.exists(result.manifest_uri)
    assert result.manifest_uri.startswith(f"s3://{bucket}/out/jobs/")


@pytest.mark.parametrize(
    ("parameters", "field"),
    [
        ({"class_count": 0}, "parameters.class_count"),
        ({"max_particles_per_class_count": 50}, "parameters.max_particles_per_class_count"),
        ({"max_resolution_a": 10.0}, "parameters.max_resolution_a"),
        ({"circular_mask_outer_diameter_a": 200.0}, "parameters.circular_mask_outer_diameter_a"),
    ],
)
def test_bad_parameters_are_invalid_argument_and_write_nothing(
    start_server: Callable, particles_uri: str, bucket: str, object_store: ObjectStore, parameters: dict, field: str
) -> None:
    _, client = start_server()
    # Box 32 at 6 Å: Nyquist 12 Å, box width 192 Å; 3 classes × 50 cannot hold 240 particles.
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(SUBMIT, _request("bad", particles_uri, f"s3://{bucket}/out", **parameters))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details()
    assert object_store.list(f"s3://{bucket}/jobs/") == []
    assert object_store.list(f"s3://{bucket}/out/") == []


@pytest.mark.parametrize(
    ("limits", "field", "reason"),
    [
        ({"max_box_size_px": 16}, "particles_uri", "box 32 exceeds this service's limit 16"),
        ({"max_particles": 100}, "particles_uri", "240 particles exceed this service's limit 100"),
        ({"max_classes": 2}, "parameters.class_count", "3 exceeds this service's limit 2"),
    ],
)
def test_requests_beyond_the_service_limits_are_invalid_argument_and_write_nothing(
    start_server: Callable, particles_uri: str, bucket: str, object_store: ObjectStore, limits: dict, field: str,
    reason: str,
) -> None:
    _, client = start_server(**limits)
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(SUBMIT, _request("limits", particles_uri, f"s3://{bucket}/out"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in caught.value.details() and reason in caught.value.details()
    assert object_store.list(f"s3://{bucket}/jobs/") == []
    assert object_store.list(f"s3://{bucket}/out/") == []


def test_a_set_of_two_pixel_sizes_is_invalid_argument(
    start_server: Callable, particles_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    table = read_star(object_store, particles_uri)
    second_group = table.optics.assign(rlnOpticsGroup=2, rlnOpticsGroupName="coarser",
                                       rlnImagePixelSize=table.optics["rlnImagePixelSize"] * 1.05)
    mixed = ParticleTable(
        optics=pd.concat([table.optics, second_group], ignore_index=True),
        particles=table.particles.assign(rlnOpticsGroup=np.arange(len(table)) % 2 + 1),
    )
    mixed_uri = f"s3://{bucket}/data/mixed.star"
    write_star(object_store, mixed_uri, mixed)
    _, client = start_server()
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(SUBMIT, _request("mixed", mixed_uri, f"s3://{bucket}/out"))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "particles_uri" in caught.value.details() and "2 different pixel sizes" in caught.value.details()
    assert object_store.list(f"s3://{bucket}/jobs/") == []
    assert object_store.list(f"s3://{bucket}/out/") == []


def test_a_cancelled_job_stops_and_publishes_nothing(
    start_server: Callable, cancel_at_iteration: Callable, particles_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    _, client = start_server()
    job = client.submit(SUBMIT, _request("cancelled", particles_uri, f"s3://{bucket}/out", online_em_iterations=200))
    job = cancel_at_iteration(client, job.name, 2)

    assert job.state == jobs_pb2.JOB_STATE_CANCELLED
    assert 2 <= job.progress.iteration < 200
    assert not object_store.exists(f"{job.outputs_uri}manifest.json")
    assert object_store.list(f"s3://{bucket}/out/") == []  # no output written, partial or whole


def test_missing_particle_set_is_not_found(start_server: Callable, bucket: str, object_store: ObjectStore) -> None:
    _, client = start_server()
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(SUBMIT, _request("missing", f"s3://{bucket}/nowhere/particles.star", f"s3://{bucket}/out"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert object_store.list(f"s3://{bucket}/jobs/") == []


def test_interrupted_job_resumes_on_another_replica_and_ends_as_an_uninterrupted_one(
    start_server: Callable, particles_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    parameters = {"online_em_iterations": 5, "max_particles_per_class_count": 100}
    first_server, first_client = start_server()
    job = first_client.submit(SUBMIT, _request("resumed", particles_uri, f"s3://{bucket}/a", **parameters))
    for update in first_client.watch(job.name, timeout_s=300):
        if update.progress.iteration >= 2:
            break
    # The replica stops mid-run (its job is left resumable); another replica takes the same request.
    stopper = threading.Thread(target=lambda: first_server.stop(5).wait())
    stopper.start()
    stopper.join()
    _, second_client = start_server()
    resumed = second_client.submit(SUBMIT, _request("resumed", particles_uri, f"s3://{bucket}/a", **parameters))
    resumed = second_client.wait(resumed.name, timeout_s=300)
    reference = second_client.submit(SUBMIT, _request("reference", particles_uri, f"s3://{bucket}/b", **parameters))
    reference = second_client.wait(reference.name, timeout_s=300)

    assert resumed.state == reference.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert resumed.attempt >= 2
    results = []
    for job_done in (resumed, reference):
        result = classify2d_pb2.Classify2DResult()
        job_done.result.Unpack(result)
        results.append(result)
    # The STAR header records when it was written; its tables must match exactly.
    resumed_table, reference_table = (read_star(object_store, result.particles_uri) for result in results)
    assert resumed_table.particles.equals(reference_table.particles)
    averages = [object_store.get_bytes(result.class_averages_uri) for result in results]
    assert averages[0] == averages[1]


@pytest.mark.parametrize(
    ("name", "n_particles", "box_px", "pixel_size_a"),
    [
        ("aspire17", 17, 200, 1.4),  # RELION 3.1, two optics groups (300 and 200 kV), old rlnClassNumber/rlnAnglePsi
        ("relion30", 7, 320, 5.0 * 1e4 / 38168),  # RELION 3.0: pixel size from detector pixel and magnification
    ],
)
def test_real_particle_sets_classify_and_keep_their_metadata(
    start_server: Callable, upload_real_set: Callable, bucket: str, object_store: ObjectStore,
    name: str, n_particles: int, box_px: int, pixel_size_a: float,
) -> None:
    star_uri, _, _ = upload_real_set(name)
    source = read_star(object_store, star_uri)
    _, client = start_server()
    cap = n_particles // 2 + 1
    request = _request(name, str(star_uri), f"s3://{bucket}/out", class_count=2, max_particles_per_class_count=cap,
                       max_resolution_a=20.0, batch_size_per_class=10)

    job = client.wait(client.submit(SUBMIT, request).name, timeout_s=300)

    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error.message
    result = classify2d_pb2.Classify2DResult()
    job.result.Unpack(result)
    counts = [c.particle_count for c in result.classes]
    assert result.particle_count == n_particles and sum(counts) == n_particles and max(counts) <= cap
    output = read_star(object_store, result.particles_uri)
    written = {"rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst", "rlnMaxValueProbDistribution"}
    kept = [column for column in source.particles.columns if column not in written | {"rlnImageName"}]
    assert kept  # CTF, coordinates, optics groups: as they came (STAR keeps 10 significant digits)
    pd.testing.assert_frame_equal(output.particles[kept], source.particles[kept], check_exact=False, rtol=1e-9)
    # Image names now resolve from anywhere: the same sections of the same stacks, by absolute URI.
    expected_names = resolve_image_names(source.particles["rlnImageName"], star_uri.parent)
    np.testing.assert_array_equal(output.particles["rlnImageName"].to_numpy(), expected_names)
    pd.testing.assert_frame_equal(output.optics, source.optics, check_exact=False, rtol=1e-9)
    np.testing.assert_array_equal(np.bincount(output.column("rlnClassNumber").astype(int), minlength=3)[1:], counts)
    psi = output.column("rlnAnglePsi").astype(float)
    assert np.all((psi >= -180.0) & (psi < 180.0))
    probability = output.column("rlnMaxValueProbDistribution").astype(float)
    assert np.all((probability > 0.0) & (probability <= 1.0))
    averages = read_mrc(object_store, result.class_averages_uri)
    assert averages.data.shape == (2, box_px, box_px) and np.all(np.isfinite(averages.data))
    assert averages.header.voxel_size_a[0] == pytest.approx(pixel_size_a, rel=1e-4)
