"""The particle set a stage request selects: its STAR read from the store, the subset applied, the service's
limits checked. Every stage's validation and job start go through here, so a bad set is refused the same way
(INVALID_ARGUMENT naming the field, NOT_FOUND for a missing object) by every service.

The selected table's image names are made absolute (``index@s3://bucket/key``, resolved from the input STAR's
folder, bucket allow-list applied), so the ``particles.star`` any stage writes from it under
``<output_uri>/jobs/<job-id>/`` names the same images and is a valid input of the next stage as it is."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cryostack.config import ServiceSettings
from cryostack.errors import InvalidArgumentError
from cryostack.io.objectstore import ObjectStore
from cryostack.io.star import ParticleTable, class_rows, read_index_list, read_star, subset_indices
from cryostack.io.uri import S3Uri
from cryostack.particles.v1 import particles_pb2


@dataclass(frozen=True)
class ParticleSet:
    """The particles a request selects, with the values every stage needs."""

    table: ParticleTable  # the selected particles, in subset order, image paths absolute s3:// URIs
    pixel_size_a: float
    box_px: int


def load_particle_set(
    objects: ObjectStore,
    settings: ServiceSettings,
    particles_uri: str,
    output_uri: str,
    subset: particles_pb2.ParticleSubset | None,
) -> ParticleSet:
    """Read the STAR at `particles_uri`, apply `subset` (None: all) and check the set against the limits."""
    if not particles_uri:
        raise InvalidArgumentError("particles_uri", "is required")
    if not output_uri:
        raise InvalidArgumentError("output_uri", "is required")
    S3Uri.parse(output_uri, "output_uri")
    star_uri = S3Uri.parse(particles_uri, "particles_uri").require_object()
    table = read_star(objects, star_uri)
    if subset is not None:
        table = table.take(_subset_rows(objects, subset, table))
    if len(table) == 0:
        raise InvalidArgumentError("particles_uri", "the particle set is empty")
    table = table.with_resolved_image_names(star_uri.parent, objects.settings.allowed_buckets)
    pixel_sizes = np.unique(table.pixel_size_a)
    if pixel_sizes.size != 1:
        raise InvalidArgumentError("particles_uri", f"particles have {pixel_sizes.size} different pixel sizes")
    box_px = table.box_size_px
    if box_px > settings.max_box_size_px:
        raise InvalidArgumentError("particles_uri", f"box {box_px} exceeds this service's limit "
                                                    f"{settings.max_box_size_px}")
    if len(table) > settings.max_particles:
        raise InvalidArgumentError("particles_uri", f"{len(table)} particles exceed this service's limit "
                                                    f"{settings.max_particles}")
    return ParticleSet(table=table, pixel_size_a=float(pixel_sizes[0]), box_px=box_px)


def check_class_count(class_count: int, settings: ServiceSettings) -> None:
    """Refuse more classes than this service allows."""
    if class_count > settings.max_classes:
        raise InvalidArgumentError("parameters.class_count",
                                   f"{class_count} exceeds this service's limit {settings.max_classes}")


def _subset_rows(objects: ObjectStore, subset: particles_pb2.ParticleSubset, table: ParticleTable) -> np.ndarray:
    """0-based rows of the set that a subset selects."""
    which = subset.WhichOneof("selection")
    if which == "random":
        return subset_indices(len(table), count=int(subset.random.particle_count), seed=int(subset.random.seed))
    if which == "index_list_uri":
        return subset_indices(len(table), indices=read_index_list(objects, subset.index_list_uri))
    if which == "class_numbers":
        return class_rows(table, list(subset.class_numbers.class_numbers))
    raise InvalidArgumentError("subset", "choose a random subset, an index list or class numbers")
