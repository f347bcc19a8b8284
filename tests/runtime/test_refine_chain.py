"""Stages chain (the staged workflow's 3D part): an abinitio job with K = 3 classes, then a heterogeneous
refinement of ALL its particles (its particles.star as it is) against its three class volumes, then a homogeneous
refinement of the two largest heterogeneous classes (selected by class number on the hetero particles.star as it is)
started from the largest class's volume; over real gRPC on loopback with a real SeaweedFS store. Every
particles.star written still names the input's images, read back through ParticleStackReader from where the STAR
now lives. Short runs: this checks what the stages hand each other, not the algorithms' quality."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from cryostack.abinitio.v1 import abinitio_pb2
from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario
from cryostack.io.dataset import write_simulated_dataset
from cryostack.io.mrc import read_mrc
from cryostack.io.objectstore import ObjectStore
from cryostack.io.star import read_star
from cryostack.particles.v1 import particles_pb2
from cryostack.refine.v1 import refine_pb2
from cryostack.runtime.client import JobClient, submit_method
from cryostack.services.abinitio.servicer import register as register_abinitio
from cryostack.services.refine.servicer import register as register_refine

from chain_helpers import finished, serve_stages, stack_images

SUBMIT_ABINITIO = submit_method(abinitio_pb2, "AbinitioService", "SubmitAbinitio")
SUBMIT_HETERO = submit_method(refine_pb2, "RefineService", "SubmitHeterogeneousRefinement")
SUBMIT_HOMO = submit_method(refine_pb2, "RefineService", "SubmitHomogeneousRefinement")
N_PARTICLES = 240
BOX_PX = 32
PIXEL_SIZE_A = 6.0  # Nyquist 12 Å
CLASS_COUNT = 3
ABINITIO = {"class_count": CLASS_COUNT, "initial_iterations": 3, "final_iterations": 2, "minibatch_size_initial": 60,
            "minibatch_size_final": 90, "max_resolution_a": 20.0}
HETERO = {"batch_size_per_class": 40, "initial_resolution_a": 20.0, "random_assignment_iterations": 1,
          "max_online_iterations": 2, "final_full_iterations": 1, "max_resolution_a": 20.0}
HOMO = {"initial_lowpass_resolution_a": 30.0, "max_iterations": 2, "global_iterations": 1, "max_resolution_a": 20.0}
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst")


@pytest.fixture
def particles_uri(object_store: ObjectStore, bucket: str) -> str:
    """A small simulated three-state set (box 32, 6 Å/px) in the test's bucket, image names relative."""
    params = SimulationParameters(n_particles=N_PARTICLES, box_px=BOX_PX, pixel_size_a=PIXEL_SIZE_A, snr=1.0, seed=7)
    dataset = write_simulated_dataset(ParticleSimulator(scenario("three-state"), params), f"s3://{bucket}/data",
                                      object_store)
    return dataset.particles_star


@pytest.fixture
def client(object_store: ObjectStore, bucket: str) -> Iterator[JobClient]:
    """A client of one in-process server running both the abinitio and the refine service."""
    with serve_stages(object_store, bucket, register_abinitio, register_refine) as connected:
        yield connected


def _class_subset(class_numbers: list[int]) -> particles_pb2.ParticleSubset:
    return particles_pb2.ParticleSubset(class_numbers=particles_pb2.ClassSelection(class_numbers=class_numbers))


def test_abinitio_classes_are_refined_heterogeneously_then_the_two_largest_homogeneously(
    client: JobClient, particles_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    output_uri = f"s3://{bucket}/runs"
    input_images = stack_images(object_store, particles_uri)
    input_names = [f"{i:06d}@s3://{bucket}/data/particles.mrcs" for i in range(1, N_PARTICLES + 1)]

    # 1. Ab initio, K = 3.
    reconstructed = abinitio_pb2.AbinitioResult()
    finished(client, client.submit(SUBMIT_ABINITIO, abinitio_pb2.SubmitAbinitioRequest(
        idempotency_key="abinitio", particles_uri=particles_uri, output_uri=output_uri, random_seed=1,
        parameters=abinitio_pb2.AbinitioParameters(**ABINITIO))), reconstructed)
    assert reconstructed.particle_count == N_PARTICLES
    assert [c.class_number for c in reconstructed.classes] == [1, 2, 3]

    # 2. Heterogeneous refinement of every particle of the abinitio STAR against its three class volumes.
    abinitio_volumes = [c.volume_uri for c in reconstructed.classes]
    classified = refine_pb2.HeterogeneousRefinementResult()
    finished(client, client.submit(SUBMIT_HETERO, refine_pb2.SubmitHeterogeneousRefinementRequest(
        idempotency_key="hetero", particles_uri=reconstructed.particles_uri, volume_uris=abinitio_volumes,
        output_uri=output_uri, random_seed=2, parameters=refine_pb2.HeterogeneousRefinementParameters(**HETERO))),
        classified)
    assert classified.particle_count == N_PARTICLES
    assert [c.class_number for c in classified.classes] == [1, 2, 3]
    assert sum(c.particle_count for c in classified.classes) == N_PARTICLES
    hetero_table = read_star(object_store, classified.particles_uri)
    assert hetero_table.particles["rlnImageName"].tolist() == input_names
    hetero_classes = hetero_table.column("rlnClassNumber").astype(int)
    np.testing.assert_array_equal(np.bincount(hetero_classes, minlength=CLASS_COUNT + 1)[1:],
                                  [c.particle_count for c in classified.classes])

    # A class number no particle of the hetero STAR has is refused at submission, before anything is written.
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(SUBMIT_HOMO, refine_pb2.SubmitHomogeneousRefinementRequest(
            idempotency_key="no-such-class", particles_uri=classified.particles_uri,
            volume_uri=classified.classes[0].volume_uri, output_uri=f"s3://{bucket}/refused",
            subset=_class_subset([CLASS_COUNT + 1]), parameters=refine_pb2.HomogeneousRefinementParameters(**HOMO)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("subset.class_numbers"), caught.value.details()
    assert object_store.list(f"s3://{bucket}/refused/") == []

    # 3. Homogeneous refinement of the two largest hetero classes, from the largest class's volume.
    largest = sorted(classified.classes, key=lambda c: c.particle_count, reverse=True)[:2]
    kept = sorted(c.class_number for c in largest)
    refined = refine_pb2.HomogeneousRefinementResult()
    finished(client, client.submit(SUBMIT_HOMO, refine_pb2.SubmitHomogeneousRefinementRequest(
        idempotency_key="homo", particles_uri=classified.particles_uri, subset=_class_subset(kept),
        volume_uri=largest[0].volume_uri, output_uri=output_uri, random_seed=3,
        parameters=refine_pb2.HomogeneousRefinementParameters(**HOMO))), refined)

    rows = np.flatnonzero(np.isin(hetero_classes, kept))
    assert refined.particle_count == rows.size == sum(c.particle_count for c in largest)
    homo_table = read_star(object_store, refined.particles_uri)
    homo_particles = homo_table.particles
    assert len(homo_particles) == rows.size
    for column in POSE_COLUMNS:
        assert np.all(np.isfinite(homo_table.column(column).astype(float))), column
    assert set(homo_table.column("rlnRandomSubset").astype(int).tolist()) == {1, 2}
    # The gold-standard split made by the hetero job is kept, so the halves stay independent across the jobs.
    np.testing.assert_array_equal(homo_table.column("rlnRandomSubset").astype(int),
                                  hetero_table.column("rlnRandomSubset").astype(int)[rows])
    assert homo_particles["rlnImageName"].tolist() == [input_names[row] for row in rows]
    np.testing.assert_array_equal(stack_images(object_store, refined.particles_uri), input_images[rows])

    volume = read_mrc(object_store, refined.map_uri)
    assert volume.data.shape == (BOX_PX,) * 3
    assert np.all(np.isfinite(volume.data))
    assert refined.gsfsc_resolution_a > 0
    assert refined.gsfsc_resolution_a >= 2 * PIXEL_SIZE_A - 1e-6
