"""The files an ab-initio job writes: class volumes, particles.star, class table, half-set FSC curves, report PNG.

Classes are renumbered by particle count, largest first: class number ``n`` (from 1) is ``class_NNN.mrc``, row
``n`` of ``classes.csv``, column ``class_n`` of ``fsc.csv``, row ``n`` of the report and ``rlnClassNumber == n`` in
``particles.star``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cryostack.core.fsc import shell_frequencies_inv_a
from cryostack.io.mrc import encode_mrc
from cryostack.io.star import ParticleTable, star_bytes
from cryostack.services.abinitio.state import AbinitioResult

PARTICLES_STAR = "particles.star"
CLASSES_CSV = "classes.csv"
FSC_CSV = "fsc.csv"
REPORT_PNG = "abinitio.png"


def volume_name(class_number: int) -> str:
    """File name of a class volume, e.g. ``class_001.mrc``."""
    return f"class_{class_number:03d}.mrc"


@dataclass(frozen=True)
class SortedClasses:
    """Classes in output order (by particle count, largest first)."""

    number: np.ndarray  # (K,) output class number (from 1) of each working class
    volumes: np.ndarray  # (K, D, D, D) float32 in output order
    counts: np.ndarray  # (K,) int64 in output order
    occupancy: np.ndarray  # (K,) float64 mean class posterior, in output order
    fsc: np.ndarray  # (K, shells) float64 half-set FSC on the working box, in output order
    resolution_a: np.ndarray  # (K,) float64 FSC-0.143 resolution of the half-set maps, in output order


def sort_classes(result: AbinitioResult) -> SortedClasses:
    """Renumber classes by particle count, largest first (ties keep their working order)."""
    counts = result.class_sizes
    order = np.argsort(-counts, kind="stable")
    number = np.empty_like(order)
    number[order] = np.arange(1, order.size + 1)
    return SortedClasses(
        number=number,
        volumes=result.volumes[order],
        counts=counts[order],
        occupancy=result.class_posteriors.mean(axis=0, dtype=np.float64)[order],
        fsc=result.half_map_fsc[order],
        resolution_a=result.resolution_a[order],
    )


def particles_table(table: ParticleTable, result: AbinitioResult, classes: SortedClasses) -> ParticleTable:
    """The input particles with class, pose, origin and the posterior of the best class."""
    best = result.best_class
    euler = result.euler_deg
    origin = result.origin_xy_a
    return table.with_columns({
        "rlnClassNumber": classes.number[best].astype(np.int64),
        "rlnAngleRot": euler[:, 0],
        "rlnAngleTilt": euler[:, 1],
        "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": origin[:, 0],
        "rlnOriginYAngst": origin[:, 1],
        "rlnMaxValueProbDistribution": result.class_posteriors[np.arange(best.size), best].astype(np.float64),
    })


def class_table(classes: SortedClasses) -> pd.DataFrame:
    """One row per class: number, volume file, particle count, occupancy and half-set resolution (Å)."""
    count = classes.counts.size
    return pd.DataFrame({
        "class_number": np.arange(1, count + 1),
        "volume": [volume_name(n) for n in range(1, count + 1)],
        "particle_count": classes.counts,
        "occupancy_fraction": classes.occupancy,
        "half_map_resolution_a": classes.resolution_a,
    })


def fsc_table(classes: SortedClasses, working_pixel_size_a: float) -> pd.DataFrame:
    """Half-set FSC of every class per shell of the working box: shell, frequency_inv_a, class_1 .. class_K."""
    shells = classes.fsc.shape[1]
    frequencies = shell_frequencies_inv_a(2 * (shells - 1), working_pixel_size_a)
    columns = {"shell": np.arange(shells), "frequency_inv_a": frequencies}
    columns.update({f"class_{n + 1}": classes.fsc[n] for n in range(classes.counts.size)})
    return pd.DataFrame(columns)


def report_png(classes: SortedClasses, *, tile_in: float = 1.3) -> bytes:
    """A PNG with one row per class: central slices (xy, xz, yz) then projections along z, y and x."""
    count = classes.counts.size
    columns = 6
    figure = Figure(figsize=(columns * tile_in, count * (tile_in + 0.3)), dpi=100)
    FigureCanvasAgg(figure)
    titles = ("slice z=0", "slice y=0", "slice x=0", "proj. z", "proj. y", "proj. x")
    for row in range(count):
        volume = classes.volumes[row]  # (D, D, D) indexed [z, y, x]
        centre = volume.shape[0] // 2
        panels = (
            volume[centre], volume[:, centre, :], volume[:, :, centre],
            volume.sum(axis=0), volume.sum(axis=1), volume.sum(axis=2),
        )
        for column, (panel, title) in enumerate(zip(panels, titles, strict=True)):
            axes = figure.add_subplot(count, columns, row * columns + column + 1)
            axes.set_axis_off()
            low, high = np.percentile(panel, [1.0, 99.5])
            axes.imshow(panel, cmap="gray", origin="lower", vmin=low, vmax=high if high > low else low + 1.0,
                        interpolation="nearest")
            label = f"class {row + 1} ({int(classes.counts[row])}): {title}" if column == 0 else title
            axes.set_title(label, fontsize=7, pad=2)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.35)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """A table as CSV text."""
    return frame.to_csv(index=False, float_format="%.6g").encode()


def write_outputs(
    write: Callable[[str, bytes], str], table: ParticleTable, result: AbinitioResult, working_pixel_size_a: float
) -> tuple[dict[str, str], SortedClasses]:
    """Write every output with ``write(relpath, data) -> uri``; the URIs by file name, and the sorted classes."""
    classes = sort_classes(result)
    uris = {}
    for number in range(1, classes.counts.size + 1):
        name = volume_name(number)
        uris[name] = write(name, encode_mrc(classes.volumes[number - 1], result.pixel_size_a, is_stack=False,
                                            name=name))
    uris[PARTICLES_STAR] = write(PARTICLES_STAR, star_bytes(particles_table(table, result, classes)))
    uris[CLASSES_CSV] = write(CLASSES_CSV, csv_bytes(class_table(classes)))
    uris[FSC_CSV] = write(FSC_CSV, csv_bytes(fsc_table(classes, working_pixel_size_a)))
    uris[REPORT_PNG] = write(REPORT_PNG, report_png(classes))
    return uris, classes
