"""A subset by class numbers (`ParticleSubset.class_numbers`) through `load_particle_set` on the real store: the
particles of the given classes in set order, their images, and every way the selection can be wrong."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from io_helpers import random_images

from cryostack.config import ServiceSettings
from cryostack.errors import InvalidArgumentError
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import ParticleStackReader, write_stack
from cryostack.io.star import ParticleTable, write_star
from cryostack.io.uri import S3Uri
from cryostack.particles.v1 import particles_pb2
from cryostack.services.inputs import load_particle_set

BOX_PX = 12
CLASSES = np.array([2, 1, 3, 2, 1, 2, 5, 3, 2, 1])  # rlnClassNumber of the ten particles


def star_with(object_store: ObjectStore, bucket_uri: S3Uri, class_numbers: np.ndarray | None) -> tuple[str, np.ndarray]:
    """A ten-particle set (one stack) with the given rlnClassNumber column (None: without it); STAR URI and images."""
    images = random_images(len(CLASSES), BOX_PX, seed=9)
    write_stack(object_store, bucket_uri.join("set/stack.mrcs"), images, 2.5)
    n = len(CLASSES)
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [2.5], "rlnImageSize": [BOX_PX],
    })
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@stack.mrcs" for i in range(n)], "rlnDefocusU": np.full(n, 1.2e4),
        "rlnDefocusV": np.full(n, 1.1e4), "rlnDefocusAngle": np.zeros(n), "rlnOpticsGroup": np.ones(n, dtype=int),
    })
    if class_numbers is not None:
        particles["rlnClassNumber"] = class_numbers
    star = bucket_uri.join("set/particles.star")
    write_star(object_store, star, ParticleTable(optics, particles, "set.star"))
    return str(star), images


def by_class(*numbers: int) -> particles_pb2.ParticleSubset:
    """A subset message selecting the given class numbers."""
    return particles_pb2.ParticleSubset(class_numbers=particles_pb2.ClassSelection(class_numbers=list(numbers)))


def test_the_particles_of_the_given_classes_are_selected_in_set_order(
    object_store: ObjectStore, bucket_uri: S3Uri
) -> None:
    star, images = star_with(object_store, bucket_uri, CLASSES)
    settings = ServiceSettings(jobs_uri=f"{bucket_uri}/jobs")

    selected = load_particle_set(object_store, settings, star, f"{bucket_uri}/out", by_class(3, 1))

    expected_rows = [1, 2, 4, 7, 9]
    assert selected.table.column("rlnClassNumber").tolist() == CLASSES[expected_rows].tolist()
    assert selected.table.image_refs.index.tolist() == expected_rows
    reader = ParticleStackReader(object_store, selected.table, star)
    np.testing.assert_array_equal(reader.read(np.arange(len(expected_rows))), images[expected_rows])
    single = load_particle_set(object_store, settings, star, f"{bucket_uri}/out", by_class(5))
    assert single.table.image_refs.index.tolist() == [6]


@pytest.mark.parametrize(
    ("class_column", "numbers", "reason"),
    [
        (None, (1,), "has no rlnClassNumber column"),
        (CLASSES, (), "lists no class number"),
        (CLASSES, (1, 4, 6), "class number(s) [4, 6]"),
        (CLASSES, (0,), "class number(s) [0]"),
        (CLASSES, (2, 2), "class numbers repeat"),
        (np.array(["a"] * len(CLASSES)), (1,), "is not numeric"),
    ],
)
def test_a_wrong_class_selection_is_invalid_argument_naming_the_field(
    object_store: ObjectStore, bucket_uri: S3Uri, class_column: np.ndarray | None, numbers: tuple[int, ...],
    reason: str,
) -> None:
    star, _ = star_with(object_store, bucket_uri, class_column)
    settings = ServiceSettings(jobs_uri=f"{bucket_uri}/jobs")
    with pytest.raises(InvalidArgumentError) as caught:
        load_particle_set(object_store, settings, star, f"{bucket_uri}/out", by_class(*numbers))
    assert caught.value.field == "subset.class_numbers"
    assert reason in caught.value.reason


def test_a_subset_with_no_selection_is_refused(object_store: ObjectStore, bucket_uri: S3Uri) -> None:
    star, _ = star_with(object_store, bucket_uri, CLASSES)
    settings = ServiceSettings(jobs_uri=f"{bucket_uri}/jobs")
    with pytest.raises(InvalidArgumentError) as caught:
        load_particle_set(object_store, settings, star, f"{bucket_uri}/out", particles_pb2.ParticleSubset())
    assert caught.value.field == "subset" and "class numbers" in caught.value.reason
