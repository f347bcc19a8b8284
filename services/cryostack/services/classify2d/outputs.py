"""The files a 2D classification job writes: class averages, particles.star, class table, FRC curves, montage.

Classes are renumbered by particle count, largest first: class number ``n`` (from 1) is image ``n`` of the
class-average stack, row ``n`` of ``classes.csv`` and ``rlnClassNumber == n`` in ``particles.star``.

A class's FRC is that of its two random half-sets' averages. Both halves were aligned to the one class average, as
in RELION's and cryoSPARC's 2D classification, so the noise that the pose search fits to it correlates between the
halves: on noisy data the FRC resolution reads finer than the class holds (on the floppy benchmark's particles,
the median class at 6.9 Å with SNR 0.03 and at 13 Å with SNR 1). It ranks the classes of one job; it is not a
gold-standard resolution.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cryostack.core.fsc import shell_frequencies_inv_a
from cryostack.io.mrc import encode_mrc
from cryostack.io.star import ParticleTable, star_bytes
from cryostack.services.classify2d.state import ClassificationResult

CLASS_AVERAGES = "class_averages.mrcs"
PARTICLES_STAR = "particles.star"
CLASSES_CSV = "classes.csv"
FRC_CSV = "frc.csv"
MONTAGE_PNG = "class_averages.png"


@dataclass(frozen=True)
class SortedClasses:
    """Classes in output order (by particle count, largest first)."""

    order: np.ndarray  # (K,) working class index of output class n-1
    number: np.ndarray  # (K,) output class number (from 1) of each working class
    averages: np.ndarray  # (K, D, D) float32 in output order
    counts: np.ndarray  # (K,) int64 in output order
    frc: np.ndarray  # (K, D // 2 + 1) in output order
    frc_resolution_a: np.ndarray  # (K,) float64 in output order, NaN where a class cannot be split


def sort_classes(result: ClassificationResult) -> SortedClasses:
    """Renumber classes by particle count, largest first (ties keep their working order)."""
    order = np.argsort(-result.counts, kind="stable")
    number = np.empty_like(order)
    number[order] = np.arange(1, order.size + 1)
    return SortedClasses(
        order=order,
        number=number,
        averages=result.averages[order],
        counts=result.counts[order],
        frc=result.frc[order],
        frc_resolution_a=result.frc_resolution_a[order],
    )


def particles_table(table: ParticleTable, result: ClassificationResult, classes: SortedClasses,
                    pixel_size_a: float) -> ParticleTable:
    """The input particles with rlnClassNumber, rlnAnglePsi, rlnOriginX/YAngst and rlnMaxValueProbDistribution."""
    assignment = result.assignment
    psi = np.mod(assignment.psi_deg + 180.0, 360.0) - 180.0  # RELION writes psi in [-180, 180)
    # An image shift s (particle = template moved by +s) is the RELION origin -s · pixel size.
    origin = -assignment.shift_px * pixel_size_a
    return table.with_columns({
        "rlnClassNumber": classes.number[assignment.labels].astype(np.int64),
        "rlnAnglePsi": psi,
        "rlnOriginXAngst": origin[:, 0],
        "rlnOriginYAngst": origin[:, 1],
        "rlnMaxValueProbDistribution": assignment.probability,
    })


def class_table(classes: SortedClasses) -> pd.DataFrame:
    """One row per class: number, particle count, FRC resolution (Å, empty when the class cannot be split)."""
    return pd.DataFrame({
        "class_number": np.arange(1, classes.counts.size + 1),
        "particle_count": classes.counts,
        "frc_resolution_a": classes.frc_resolution_a,
    })


def frc_table(classes: SortedClasses, box_px: int, pixel_size_a: float) -> pd.DataFrame:
    """Half-set FRC of every class per shell: columns shell, frequency_inv_a, class_1 .. class_K."""
    frequencies = shell_frequencies_inv_a(box_px, pixel_size_a)
    columns = {"shell": np.arange(frequencies.size), "frequency_inv_a": frequencies}
    columns.update({f"class_{n + 1}": classes.frc[n] for n in range(classes.counts.size)})
    return pd.DataFrame(columns)


def class_averages_bytes(classes: SortedClasses, pixel_size_a: float) -> bytes:
    """The class averages as an MRC stack (mode 2, voxel size set)."""
    return encode_mrc(classes.averages, pixel_size_a, is_stack=True, name=CLASS_AVERAGES)


def montage_png(classes: SortedClasses, *, columns: int | None = None, tile_in: float = 1.2) -> bytes:
    """A PNG grid of the class averages, each titled with its class number and particle count."""
    count = classes.counts.size
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(columns * tile_in, rows * (tile_in + 0.25)), dpi=100)
    FigureCanvasAgg(figure)
    for index in range(rows * columns):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.set_axis_off()
        if index >= count:
            continue
        image = classes.averages[index]
        # Each class on its own grey scale (robust limits), as class-average galleries show them.
        low, high = np.percentile(image, [1.0, 99.0])
        axes.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1.0, interpolation="nearest")
        axes.set_title(f"{index + 1}: {int(classes.counts[index])}", fontsize=7, pad=2)
    figure.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """A table as CSV text (empty cells for NaN)."""
    return frame.to_csv(index=False, float_format="%.6g").encode()


def write_outputs(write, table: ParticleTable, result: ClassificationResult, pixel_size_a: float,
                  box_px: int) -> dict[str, str]:
    """Write every output with ``write(relpath, data) -> uri``; returns the URIs by file name."""
    classes = sort_classes(result)
    return {
        CLASS_AVERAGES: write(CLASS_AVERAGES, class_averages_bytes(classes, pixel_size_a)),
        PARTICLES_STAR: write(PARTICLES_STAR, star_bytes(particles_table(table, result, classes, pixel_size_a))),
        CLASSES_CSV: write(CLASSES_CSV, csv_bytes(class_table(classes))),
        FRC_CSV: write(FRC_CSV, csv_bytes(frc_table(classes, box_px, pixel_size_a))),
        MONTAGE_PNG: write(MONTAGE_PNG, montage_png(classes)),
    }
