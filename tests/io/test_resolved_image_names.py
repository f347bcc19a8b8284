"""Image names made absolute (`resolve_image_names`): a STAR written anywhere from a resolved table names the same
images, keys stay validated and the bucket allow-list applies; `load_particle_set` hands every stage such a table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from io_helpers import random_images

from cryostack.config import ServiceSettings
from cryostack.errors import InvalidArgumentError, NotFoundError
from cryostack.io.objectstore import ObjectStore
from cryostack.io.particles import ParticleStackReader, write_stack
from cryostack.io.star import ParticleTable, read_star, resolve_image_names, write_star
from cryostack.io.uri import S3Uri
from cryostack.services.inputs import load_particle_set

BOX_PX = 16


def table_of(names: list[str]) -> ParticleTable:
    """A one-optics-group table with the given image names."""
    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnVoltage": [300.0], "rlnSphericalAberration": [2.7],
        "rlnAmplitudeContrast": [0.1], "rlnImagePixelSize": [2.0], "rlnImageSize": [BOX_PX],
    })
    n = len(names)
    particles = pd.DataFrame({
        "rlnImageName": names, "rlnDefocusU": np.full(n, 1.5e4), "rlnDefocusV": np.full(n, 1.4e4),
        "rlnDefocusAngle": np.zeros(n), "rlnOpticsGroup": np.ones(n, dtype=int),
    })
    return ParticleTable(optics, particles, "set.star")


def test_relative_paths_become_absolute_and_absolute_ones_stay() -> None:
    folder = S3Uri("data", "sets/one/")
    names = ["000001@stacks/a.mrcs", "2@./stacks/a.mrcs", " 7@b.mrcs ", "3@s3://other/x/c.mrcs"]
    resolved = resolve_image_names(names, folder)
    assert resolved.tolist() == [
        "000001@s3://data/sets/one/stacks/a.mrcs",
        "2@s3://data/sets/one/stacks/a.mrcs",
        "7@s3://data/sets/one/b.mrcs",
        "3@s3://other/x/c.mrcs",
    ]
    # Resolving again from anywhere changes nothing.
    assert resolve_image_names(resolved, S3Uri("elsewhere", "jobs/42/")).tolist() == resolved.tolist()


@pytest.mark.parametrize(
    ("name", "allowed", "reason"),
    [
        ("1@../a.mrcs", [], "'..'"),
        ("1@s3://data/x/../a.mrcs", [], "'..'"),
        ("1@s3://other/a.mrcs", ["data"], "'other' is not one of the allowed buckets"),
        ("1@stacks/", [], "folder"),
        ("a.mrcs", [], "is not '<index>@<stack path>'"),
    ],
)
def test_unsafe_or_disallowed_paths_are_refused_naming_the_field(name: str, allowed: list[str], reason: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        resolve_image_names(["1@ok.mrcs", name], S3Uri("data", "sets/"), allowed, "set.star:rlnImageName")
    assert caught.value.field == "set.star:rlnImageName"
    assert reason in caught.value.reason


def test_a_resolved_table_written_elsewhere_reads_the_same_images(
    object_store: ObjectStore, bucket_uri: S3Uri
) -> None:
    images = random_images(6, BOX_PX, seed=4)
    write_stack(object_store, bucket_uri.join("data/stacks/s.mrcs"), images, 2.0)
    source = bucket_uri.join("data/particles.star")
    write_star(object_store, source, table_of([f"{i:06d}@stacks/s.mrcs" for i in (3, 1, 6)]))
    table = read_star(object_store, source)

    moved = bucket_uri.join("runs/out/jobs/abc/particles.star")
    write_star(object_store, moved, table.with_resolved_image_names(source.parent))

    reread = read_star(object_store, moved)
    assert reread.particles["rlnImageName"].tolist() == [
        f"{i:06d}@s3://{bucket_uri.bucket}/data/stacks/s.mrcs" for i in (3, 1, 6)
    ]
    got = ParticleStackReader.from_star(object_store, moved).read(np.arange(3))
    np.testing.assert_array_equal(got, images[[2, 0, 5]])
    # Written verbatim instead, the relative names point into the job folder, where no stack is.
    write_star(object_store, moved, table)
    with pytest.raises(NotFoundError) as missing:
        ParticleStackReader.from_star(object_store, moved).read(np.arange(3))
    assert missing.value.name == str(moved.parent.join("stacks/s.mrcs"))


def test_every_stage_gets_absolute_image_names_and_the_allow_list_applies(
    object_store: ObjectStore, bucket_uri: S3Uri
) -> None:
    write_stack(object_store, bucket_uri.join("data/s.mrcs"), random_images(2, BOX_PX), 2.0)
    star = bucket_uri.join("data/particles.star")
    write_star(object_store, star, table_of(["1@s.mrcs", "2@s3://elsewhere/s.mrcs"]))
    settings = ServiceSettings(jobs_uri=f"{bucket_uri}/jobs")

    selected = load_particle_set(object_store, settings, str(star), f"{bucket_uri}/out", None)
    assert selected.table.particles["rlnImageName"].tolist() == [
        f"1@s3://{bucket_uri.bucket}/data/s.mrcs", "2@s3://elsewhere/s.mrcs"]

    restricted = ObjectStore(object_store.settings.model_copy(update={"allowed_buckets": [bucket_uri.bucket]}))
    with restricted, pytest.raises(InvalidArgumentError) as caught:
        load_particle_set(restricted, settings, str(star), f"{bucket_uri}/out", None)
    assert caught.value.field == f"{star}:rlnImageName"
    assert "'elsewhere'" in caught.value.reason
