"""The refine service over real gRPC on loopback with a real SeaweedFS store: a tiny heterogeneous and a tiny
homogeneous job succeed with every output readable by mrcfile and starfile and the manifest written last; bad
requests (parameters, volumes) are refused naming the field before anything is written; a cancelled job resumes from
its checkpoint on resubmission and ends as an uninterrupted one."""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryostack.config import ServiceSettings
from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario
from cryostack.io.dataset import write_simulated_dataset
from cryostack.io.mrc import HEADER_BYTES, encode_mrc
from cryostack.io.objectstore import ObjectStore
from cryostack.io.star import read_star
from cryostack.jobs.v1 import jobs_pb2
from cryostack.particles.v1 import particles_pb2
from cryostack.refine.v1 import refine_pb2
from cryostack.runtime import CryostackServer, JobRunner, JobStore, create_server
from cryostack.runtime.client import JobClient, submit_method
from cryostack.services.refine.parameters import HeteroParameters, HomoParameters
from cryostack.services.refine.results import RefineIterationReport
from cryostack.services.refine.servicer import HeteroWork, homo_fraction, register

SUBMIT_HETERO = submit_method(refine_pb2, "RefineService", "SubmitHeterogeneousRefinement")
SUBMIT_HOMO = submit_method(refine_pb2, "RefineService", "SubmitHomogeneousRefinement")
N_PARTICLES = 200
BOX_PX = 32
PIXEL_SIZE_A = 6.0  # Nyquist 12 Å
RUNNER_TIMINGS = {"lease_s": 1.5, "cancel_poll_s": 0.2, "progress_write_s": 0.2}
# One online and one full iteration searched to 24 Å: these tests check the service; the algorithms' quality is
# tested elsewhere.
FAST_HETERO = {"batch_size_per_class": 50, "initial_resolution_a": 30.0, "random_assignment_iterations": 0,
               "max_online_iterations": 1, "final_full_iterations": 1, "max_resolution_a": 24.0}
FAST_HOMO = {"initial_lowpass_resolution_a": 30.0, "max_iterations": 2, "global_iterations": 1,
             "max_resolution_a": 24.0}
# The simulated three-state set's true maps (written beside it): the closed state and the one without the domain.
CLOSED_MAP = "ground_truth/maps/state0_closed.mrc"
ABSENT_MAP = "ground_truth/maps/state2_domain_absent.mrc"


@pytest.fixture
def data_uri(object_store: ObjectStore, bucket: str) -> str:
    """Folder of a small simulated three-state set (box 32, 6 Å/px) with its true maps, in the test's bucket."""
    params = SimulationParameters(n_particles=N_PARTICLES, box_px=BOX_PX, pixel_size_a=PIXEL_SIZE_A, snr=0.5, seed=7)
    write_simulated_dataset(ParticleSimulator(scenario("three-state"), params), f"s3://{bucket}/data", object_store)
    return f"s3://{bucket}/data/"


@pytest.fixture
def start_server(object_store: ObjectStore, bucket: str) -> Iterator[Callable[..., tuple[CryostackServer, JobClient]]]:
    """Start in-process refine replicas sharing the test bucket's job store."""
    started: list[tuple[CryostackServer, JobClient]] = []

    def start(**overrides: object) -> tuple[CryostackServer, JobClient]:
        settings = ServiceSettings(jobs_uri=f"s3://{bucket}/jobs", max_workers=1, **overrides)
        runner = JobRunner(JobStore(object_store, settings.jobs_uri), settings, **RUNNER_TIMINGS)
        server, port = create_server(settings, runner, register)
        server.start()
        started.append((server, JobClient(f"127.0.0.1:{port}")))
        return started[-1]

    yield start
    for server, client in started:
        client.close()
        server.stop(0).wait()


def _hetero(key: str, data_uri: str, output_uri: str, volumes: list[str], subset: int | None = None,
            **parameters: object) -> refine_pb2.SubmitHeterogeneousRefinementRequest:
    request = refine_pb2.SubmitHeterogeneousRefinementRequest(
        idempotency_key=key, particles_uri=data_uri + "particles.star", volume_uris=volumes, output_uri=output_uri,
        random_seed=11, parameters=refine_pb2.HeterogeneousRefinementParameters(**{**FAST_HETERO, **parameters}),
    )
    if subset is not None:
        request.subset.CopyFrom(particles_pb2.ParticleSubset(
            random=particles_pb2.RandomSubset(particle_count=subset, seed=3)))
    return request


def _homo(key: str, data_uri: str, output_uri: str, volume: str,
          **parameters: object) -> refine_pb2.SubmitHomogeneousRefinementRequest:
    return refine_pb2.SubmitHomogeneousRefinementRequest(
        idempotency_key=key, particles_uri=data_uri + "particles.star", volume_uri=volume, output_uri=output_uri,
        random_seed=5, parameters=refine_pb2.HomogeneousRefinementParameters(**{**FAST_HOMO, **parameters}),
    )


def _local(object_store: ObjectStore, uri: str, folder: Path) -> Path:
    """A local copy of an object, for file readers."""
    path = folder / uri.rsplit("/", 1)[-1]
    path.write_bytes(object_store.get_bytes(uri))
    return path


def _check_map(object_store: ObjectStore, uri: str, folder: Path) -> np.ndarray:
    """Read a map with mrcfile (strict), check its shape and voxel size; its data (D, D, D)."""
    with mrcfile.open(_local(object_store, uri, folder), permissive=False) as mrc:
        assert mrc.data.shape == (BOX_PX,) * 3
        assert float(mrc.voxel_size.x) == pytest.approx(PIXEL_SIZE_A)
        assert np.all(np.isfinite(mrc.data))
        return np.array(mrc.data)


def _check_manifest(object_store: ObjectStore, job: jobs_pb2.Job, expected: set[str], inputs: list[str]) -> None:
    """The manifest lists exactly the expected outputs and the inputs, and was written after each output."""
    manifest = json.loads(object_store.get_bytes(job.manifest_uri))
    listed = {entry["path"] for entry in manifest["outputs"]}
    assert listed == expected
    assert set(inputs) <= set(manifest["input_uris"])
    manifest_time = object_store.stat(job.manifest_uri).last_modified
    for path in listed:
        assert object_store.stat(job.outputs_uri + path).last_modified <= manifest_time


def _check_poses(particles) -> None:  # noqa: ANN001  (pandas frame from starfile)
    for column in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"):
        assert np.all(np.isfinite(particles[column].astype(float))), column
    assert set(particles["rlnRandomSubset"]) == {1, 2}
    assert particles["rlnImageName"].str.contains("@s3://").all()  # valid from the job folder


def test_heterogeneous_job_writes_every_output_in_class_number_order(
    start_server: Callable, data_uri: str, bucket: str, object_store: ObjectStore, tmp_path: Path
) -> None:
    _, client = start_server()
    volumes = [data_uri + CLOSED_MAP, data_uri + ABSENT_MAP]
    job = client.submit(SUBMIT_HETERO, _hetero("hetero", data_uri, f"s3://{bucket}/out", volumes))
    updates = list(client.watch(job.name, timeout_s=600))
    job = client.get(job.name)

    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error.message
    iterations = [update.progress for update in updates if update.progress.iteration > 0]
    assert {p.stage for p in iterations} <= {"hetero-online", "hetero-full"}
    assert job.progress.stage == "hetero-full" and job.progress.iteration == 2 and job.progress.fraction == 1.0
    assert job.progress.total_iterations == 2
    assert all(0.0 <= p.fraction <= 1.0 and p.current_resolution_a >= 12.0 for p in iterations)
    assert all("class_1_fraction" in p.summary and "class_2_fraction" in p.summary for p in iterations)
    assert any("class sizes" in p.message and "half maps at" in p.message for p in iterations)

    result = refine_pb2.HeterogeneousRefinementResult()
    assert job.result.Unpack(result)
    assert result.particle_count == N_PARTICLES and result.iteration_count == 2
    assert [c.class_number for c in result.classes] == [1, 2]
    assert sum(c.particle_count for c in result.classes) == N_PARTICLES
    for refined in result.classes:
        for uri in (refined.volume_uri, refined.half_map_a_uri, refined.half_map_b_uri):
            _check_map(object_store, uri, tmp_path)
        if refined.HasField("gsfsc_resolution_a"):
            assert refined.gsfsc_resolution_a >= 12.0 - 1e-6
    assert result.classes[1].volume_uri.endswith("class_002.mrc")

    particles = starfile.read(_local(object_store, result.particles_uri, tmp_path))["particles"]
    assert len(particles) == N_PARTICLES
    counts = np.bincount(particles["rlnClassNumber"].astype(int), minlength=3)
    np.testing.assert_array_equal(counts[1:], [c.particle_count for c in result.classes])
    probability = particles["rlnMaxValueProbDistribution"].astype(float)
    assert np.all((probability >= 0.5 - 1e-6) & (probability <= 1.0 + 1e-6))
    _check_poses(particles)

    classes = pd.read_csv(io.BytesIO(object_store.get_bytes(job.outputs_uri + "classes.csv")))
    assert classes["class_number"].tolist() == [1, 2]
    assert classes["particle_count"].tolist() == [c.particle_count for c in result.classes]
    assert object_store.get_bytes(result.report_png_uri)[:4] == b"\x89PNG"
    fsc_header = object_store.get_bytes(result.fsc_csv_uri).decode().splitlines()[0]
    assert fsc_header == "shell,frequency_inv_a,resolution_a,class_1,class_2"
    outputs = {f"class_{n:03d}{suffix}.mrc" for n in (1, 2) for suffix in ("", "_half_a", "_half_b")}
    _check_manifest(object_store, job, outputs | {"particles.star", "classes.csv", "fsc.csv", "hetero.png"},
                    volumes)


def test_homogeneous_job_writes_map_half_maps_mask_and_fsc(
    start_server: Callable, data_uri: str, bucket: str, object_store: ObjectStore, tmp_path: Path
) -> None:
    _, client = start_server()
    volume = data_uri + CLOSED_MAP
    job = client.submit(SUBMIT_HOMO, _homo("homo", data_uri, f"s3://{bucket}/out", volume))
    job = client.wait(job.name, timeout_s=600)

    assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED, job.error.message
    assert job.progress.stage in ("homo-global", "homo-local") and job.progress.fraction == 1.0
    assert job.progress.iteration == 2 and job.progress.total_iterations == 2
    result = refine_pb2.HomogeneousRefinementResult()
    assert job.result.Unpack(result)
    assert result.particle_count == N_PARTICLES and result.iteration_count == 2
    assert result.gsfsc_resolution_a >= 12.0 - 1e-6
    for uri in (result.map_uri, result.half_map_a_uri, result.half_map_b_uri):
        _check_map(object_store, uri, tmp_path)
    mask = _check_map(object_store, result.mask_uri, tmp_path)
    assert mask.min() >= 0.0 and mask.max() <= 1.0 and mask.max() > 0.0

    particles = starfile.read(_local(object_store, result.particles_uri, tmp_path))["particles"]
    assert len(particles) == N_PARTICLES
    _check_poses(particles)
    fsc_header = object_store.get_bytes(result.fsc_csv_uri).decode().splitlines()[0]
    assert fsc_header == "shell,frequency_inv_a,resolution_a,unmasked,masked,corrected"
    assert object_store.get_bytes(result.report_png_uri)[:4] == b"\x89PNG"
    _check_manifest(object_store, job, {"map.mrc", "half_map_a.mrc", "half_map_b.mrc", "mask.mrc",
                                        "particles.star", "fsc.csv", "homo.png"}, [volume])


def _put(object_store: ObjectStore, bucket: str, name: str, data: bytes) -> str:
    uri = f"s3://{bucket}/volumes/{name}"
    object_store.put_bytes(uri, data)
    return uri


def _with_nan(volume: np.ndarray) -> bytes:
    """A valid MRC of ``volume`` with one voxel overwritten by NaN (encode_mrc itself refuses NaN)."""
    raw = bytearray(encode_mrc(volume, PIXEL_SIZE_A))
    struct.pack_into("<f", raw, HEADER_BYTES + 4 * 1000, float("nan"))
    return bytes(raw)


# Bad volumes: name -> (its bytes, a fragment the error must contain besides the field).
_CUBE = np.ones((BOX_PX,) * 3, dtype=np.float32)
BAD_VOLUMES: dict[str, tuple[bytes, str]] = {
    "tiny": (b"not a map", "fewer than a header"),
    "corrupt": (b"this is not an MRC file " * 100, "corrupt MRC header"),
    "truncated": (encode_mrc(_CUBE, PIXEL_SIZE_A)[:-400], "truncated"),
    "wrong-box": (encode_mrc(np.ones((24, 24, 24), dtype=np.float32), PIXEL_SIZE_A), "24 x 24 x 24"),
    "not-a-cube": (encode_mrc(np.ones((16, BOX_PX, BOX_PX), dtype=np.float32), PIXEL_SIZE_A), "32 x 32 x 16"),
    "wrong-pixel": (encode_mrc(_CUBE, 5.0), "voxel size 5 x 5 x 5 Å differs from the particles' pixel size 6 Å"),
    "nan": (_with_nan(_CUBE), "NaN"),
}


@pytest.mark.parametrize("name", list(BAD_VOLUMES))
def test_a_bad_volume_is_invalid_argument_naming_it_and_writes_nothing(
    start_server: Callable, data_uri: str, bucket: str, object_store: ObjectStore, name: str
) -> None:
    _, client = start_server()
    data, fragment = BAD_VOLUMES[name]
    bad = _put(object_store, bucket, f"{name}.mrc", data)
    requests = [
        (SUBMIT_HETERO, _hetero("bad", data_uri, f"s3://{bucket}/out", [data_uri + CLOSED_MAP, bad]),
         "volume_uris[1]"),
        (SUBMIT_HOMO, _homo("bad", data_uri, f"s3://{bucket}/out", bad), "volume_uri"),
    ]
    for method, request, field in requests:
        with pytest.raises(grpc.RpcError) as caught:
            client.submit(method, request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}: {bad}"), caught.value.details()
        assert fragment in caught.value.details()
        if name == "wrong-box":
            assert "32 x 32 x 32" in caught.value.details()
    assert object_store.list(f"s3://{bucket}/jobs/") == []
    assert object_store.list(f"s3://{bucket}/out/") == []


@pytest.mark.parametrize(
    ("method", "build", "code", "field"),
    [
        (SUBMIT_HETERO, lambda d, b: _hetero("k", d, f"{b}/out", []), grpc.StatusCode.INVALID_ARGUMENT,
         "volume_uris"),
        (SUBMIT_HETERO, lambda d, b: _hetero("k", d, f"{b}/out", [d + CLOSED_MAP, f"{b}/nowhere.mrc"]),
         grpc.StatusCode.NOT_FOUND, "volume_uris[1]"),
        (SUBMIT_HETERO, lambda d, b: _hetero("k", d, f"{b}/out", [d + CLOSED_MAP] * 3),
         grpc.StatusCode.INVALID_ARGUMENT, "volume_uris"),
        (SUBMIT_HETERO, lambda d, b: _hetero("k", d, f"{b}/out", ["http://x/a.mrc"]),
         grpc.StatusCode.INVALID_ARGUMENT, "volume_uris[0]"),
        (SUBMIT_HETERO, lambda d, b: _hetero("k", d, f"{b}/out", [d + CLOSED_MAP],
                                             convergence_class_change_fraction=1.5),
         grpc.StatusCode.INVALID_ARGUMENT, "parameters.convergence_class_change_fraction"),
        (SUBMIT_HETERO, lambda d, b: _hetero("k", d, f"{b}/out", [d + CLOSED_MAP], max_resolution_a=10.0),
         grpc.StatusCode.INVALID_ARGUMENT, "parameters.max_resolution_a"),
        (SUBMIT_HETERO, lambda d, b: _hetero("k", d, f"{b}/out", [d + CLOSED_MAP], subset=N_PARTICLES + 1),
         grpc.StatusCode.INVALID_ARGUMENT, "subset.count"),
        (SUBMIT_HOMO, lambda d, b: _homo("k", d, f"{b}/out", ""), grpc.StatusCode.INVALID_ARGUMENT, "volume_uri"),
        (SUBMIT_HOMO, lambda d, b: _homo("k", d, f"{b}/out", f"{b}/nowhere.mrc"), grpc.StatusCode.NOT_FOUND,
         "volume_uri"),
        (SUBMIT_HOMO, lambda d, b: _homo("k", d, f"{b}/out", d + CLOSED_MAP, mask_threshold_fraction=0.0),
         grpc.StatusCode.INVALID_ARGUMENT, "parameters.mask_threshold_fraction"),
        (SUBMIT_HOMO, lambda d, b: _homo("k", f"{b}/missing/", f"{b}/out", d + CLOSED_MAP),
         grpc.StatusCode.NOT_FOUND, "s3://{bucket}/missing/particles.star"),
    ],
    ids=["no-volume", "missing-volume", "over-class-limit", "not-s3", "convergence", "finer-than-nyquist",
         "subset", "homo-no-volume", "homo-missing-volume", "mask-threshold", "missing-particles"],
)
def test_a_bad_request_is_refused_naming_the_field_and_writes_nothing(
    start_server: Callable, data_uri: str, bucket: str, object_store: ObjectStore, method: str,
    build: Callable[[str, str], object], code: grpc.StatusCode, field: str,
) -> None:
    _, client = start_server(max_classes=2)
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(method, build(data_uri, f"s3://{bucket}"))
    assert caught.value.code() == code
    assert caught.value.details().startswith(f"{field.format(bucket=bucket)}: "), caught.value.details()
    assert object_store.list(f"s3://{bucket}/jobs/") == []
    assert object_store.list(f"s3://{bucket}/out/") == []


def test_a_cancelled_job_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
    start_server: Callable, cancel_at_iteration: Callable, data_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    _, client = start_server()
    volumes = [data_uri + CLOSED_MAP, data_uri + ABSENT_MAP]
    parameters = {"max_online_iterations": 3, "convergence_class_change_fraction": 0.001}

    def request(key: str, folder: str) -> refine_pb2.SubmitHeterogeneousRefinementRequest:
        return _hetero(key, data_uri, f"s3://{bucket}/{folder}", volumes, subset=120, **parameters)

    cancelled = cancel_at_iteration(client, client.submit(SUBMIT_HETERO, request("resumed", "a")).name, 1)
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    assert 1 <= cancelled.progress.iteration < 4
    resubmitted = client.submit(SUBMIT_HETERO, request("resumed", "a"))
    messages = [update.progress.message for update in client.watch(resubmitted.name, timeout_s=600)]
    resumed = client.get(resubmitted.name)
    reference = client.wait(client.submit(SUBMIT_HETERO, request("reference", "b")).name, timeout_s=600)

    assert resumed.state == reference.state == jobs_pb2.JOB_STATE_SUCCEEDED, resumed.error.message
    assert resumed.attempt >= 2 and "resuming" in messages
    results = []
    for job in (resumed, reference):
        result = refine_pb2.HeterogeneousRefinementResult()
        job.result.Unpack(result)
        results.append(result)
    assert results[0].iteration_count == results[1].iteration_count
    for resumed_class, reference_class in zip(results[0].classes, results[1].classes, strict=True):
        assert object_store.get_bytes(resumed_class.volume_uri) == object_store.get_bytes(reference_class.volume_uri)
    # The STAR header records when it was written; its tables must match exactly.
    resumed_table, reference_table = (read_star(object_store, result.particles_uri) for result in results)
    assert resumed_table.particles.equals(reference_table.particles)


def _iteration(iteration: int, phase: str, scored: int) -> RefineIterationReport:
    return RefineIterationReport(iteration=iteration, phase=phase, resolution_a=20.0, particles_scored=scored,
                                 class_fractions=np.array([0.5, 0.5]), class_change_fraction=0.1,
                                 half_map_resolution_a=np.array([25.0, 26.0]))


def test_progress_fraction_rises_to_one_and_the_plan_is_known_once_online_em_ends() -> None:
    params = HeteroParameters(batch_size_per_class=10, random_assignment_iterations=2, final_full_iterations=2,
                              max_online_iterations=6)
    work = HeteroWork(params, n_particles=100, class_count=2)
    fractions, plans = [], []
    for iteration, phase in enumerate(["random", "random", "online", "online", "full", "full"], start=1):
        work.record(_iteration(iteration, phase, 100 if phase == "full" else 20))
        fractions.append(work.fraction(done=iteration == 6))
        plans.append(work.total_iterations())

    # Online minibatches of 20 visits, full passes of 100: until online EM ends, 6 online iterations are expected.
    np.testing.assert_allclose(fractions[:4], [20 / 320, 40 / 320, 60 / 320, 80 / 320])
    np.testing.assert_allclose(fractions[4], 180 / 280)
    assert fractions[5] == 1.0
    assert plans == [0, 0, 0, 0, 6, 6]

    bounded = HomoParameters(max_iterations=3)
    assert [homo_fraction(i, bounded, done=i == 3) for i in (1, 2, 3)] == [1 / 3, 2 / 3, 1.0]
    assert [homo_fraction(i, HomoParameters(), done=False) for i in (1, 8, 20)] == [1 / 8, 8 / 9, 20 / 21]
