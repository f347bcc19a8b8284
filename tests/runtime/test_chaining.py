"""Stages chain: the particles.star a classify2d job writes is, as it is, the input of an abinitio job (here its
largest classes, by class number), over real gRPC on loopback with a real SeaweedFS store; every particles.star
written names the input's images, read back through ParticleStackReader from where the STAR now lives."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from cryostack.abinitio.v1 import abinitio_pb2
from cryostack.classify2d.v1 import classify2d_pb2
from cryostack.core.simulate import ParticleSimulator, SimulationParameters, scenario
from cryostack.io.dataset import write_simulated_dataset
from cryostack.io.objectstore import ObjectStore
from cryostack.io.star import read_star
from cryostack.particles.v1 import particles_pb2
from cryostack.runtime.client import JobClient, submit_method
from cryostack.services.abinitio.servicer import register as register_abinitio
from cryostack.services.classify2d.servicer import register as register_classify2d

from chain_helpers import finished, serve_stages, stack_images

SUBMIT_CLASSIFY2D = submit_method(classify2d_pb2, "Classify2DService", "SubmitClassify2D")
SUBMIT_ABINITIO = submit_method(abinitio_pb2, "AbinitioService", "SubmitAbinitio")
N_PARTICLES = 150
# Short runs: these tests check what the stages hand each other, not the algorithms' quality.
CLASSIFY2D = {"class_count": 3, "online_em_iterations": 2, "batch_size_per_class": 30, "max_resolution_a": 12.0}
ABINITIO = {"class_count": 1, "initial_iterations": 2, "final_iterations": 1, "minibatch_size_initial": 30,
            "minibatch_size_final": 40, "max_resolution_a": 24.0}


@pytest.fixture
def particles_uri(object_store: ObjectStore, bucket: str) -> str:
    """A small simulated floppy-protein set (box 32, 6 Å/px) in the test's bucket, image names relative."""
    params = SimulationParameters(n_particles=N_PARTICLES, box_px=32, pixel_size_a=6.0, snr=0.5, seed=5)
    dataset = write_simulated_dataset(ParticleSimulator(scenario("floppy"), params), f"s3://{bucket}/data",
                                      object_store)
    return dataset.particles_star


@pytest.fixture
def client(object_store: ObjectStore, bucket: str) -> Iterator[JobClient]:
    """A client of one in-process server running both the classify2d and the abinitio service."""
    with serve_stages(object_store, bucket, register_classify2d, register_abinitio) as connected:
        yield connected


def test_classify2d_output_is_the_input_of_an_abinitio_job_on_its_largest_classes(
    client: JobClient, particles_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    classified = classify2d_pb2.Classify2DResult()
    finished(client, client.submit(SUBMIT_CLASSIFY2D, classify2d_pb2.SubmitClassify2DRequest(
        idempotency_key="classify", particles_uri=particles_uri, output_uri=f"s3://{bucket}/runs", random_seed=1,
        parameters=classify2d_pb2.Classify2DParameters(**CLASSIFY2D))), classified)

    # The classify2d STAR lives in the job folder, far from the stack, and still names the input's images.
    assert classified.particles_uri.startswith(f"s3://{bucket}/runs/jobs/")
    input_images = stack_images(object_store, particles_uri)
    classify2d_table = read_star(object_store, classified.particles_uri)
    assert classify2d_table.particles["rlnImageName"].tolist() == [
        f"{i:06d}@s3://{bucket}/data/particles.mrcs" for i in range(1, N_PARTICLES + 1)
    ]
    np.testing.assert_array_equal(stack_images(object_store, classified.particles_uri), input_images)

    kept = [1, 2]
    counts = {summary.class_number: summary.particle_count for summary in classified.classes}
    reconstructed = abinitio_pb2.AbinitioResult()
    finished(client, client.submit(SUBMIT_ABINITIO, abinitio_pb2.SubmitAbinitioRequest(
        idempotency_key="abinitio", particles_uri=classified.particles_uri, output_uri=f"s3://{bucket}/runs",
        random_seed=2, parameters=abinitio_pb2.AbinitioParameters(**ABINITIO),
        subset=particles_pb2.ParticleSubset(class_numbers=particles_pb2.ClassSelection(class_numbers=kept)))),
        reconstructed)

    rows = np.flatnonzero(np.isin(classify2d_table.column("rlnClassNumber"), kept))
    assert reconstructed.particle_count == rows.size == counts[1] + counts[2]
    abinitio_table = read_star(object_store, reconstructed.particles_uri)
    assert abinitio_table.particles["rlnImageName"].tolist() == (
        classify2d_table.particles["rlnImageName"].iloc[rows].tolist())
    np.testing.assert_array_equal(stack_images(object_store, reconstructed.particles_uri), input_images[rows])


def test_selecting_classes_of_a_set_without_classes_is_refused_before_anything_is_written(
    client: JobClient, particles_uri: str, bucket: str, object_store: ObjectStore
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        client.submit(SUBMIT_ABINITIO, abinitio_pb2.SubmitAbinitioRequest(
            idempotency_key="no-classes", particles_uri=particles_uri, output_uri=f"s3://{bucket}/runs",
            parameters=abinitio_pb2.AbinitioParameters(**ABINITIO),
            subset=particles_pb2.ParticleSubset(class_numbers=particles_pb2.ClassSelection(class_numbers=[1]))))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "subset.class_numbers" in caught.value.details()
    assert object_store.list(f"s3://{bucket}/jobs/") == []
    assert object_store.list(f"s3://{bucket}/runs/") == []
