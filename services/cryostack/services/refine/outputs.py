"""The files a refinement job writes: maps and half-maps, particles.star, FSC curves, class table and report PNG.

Heterogeneous refinement keeps the request's class numbers: class ``n`` (from 1) is the ``n``-th input volume, so
``class_NNN.mrc`` with its half-maps ``class_NNN_half_a.mrc`` / ``class_NNN_half_b.mrc``, row ``n`` of
``classes.csv``, column ``class_n`` of ``fsc.csv`` and ``rlnClassNumber == n`` in ``particles.star`` all refer to
the class refined from ``volume_uris[n - 1]``. Homogeneous refinement writes ``map.mrc``, ``half_map_a.mrc``,
``half_map_b.mrc``, ``mask.mrc``, ``particles.star``, ``fsc.csv`` and ``homo.png``.

``particles.star`` is the selected input table (image names already absolute, see
:func:`cryostack.services.inputs.load_particle_set`) plus the poses (RELION ZYZ degrees), origins in Å and the
half-set (``rlnRandomSubset`` 1 or 2), so it is a valid input of the next stage wherever it is written.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cryostack.core.fsc import HALF_MAP_THRESHOLD, shell_frequencies_inv_a
from cryostack.io.mrc import encode_mrc
from cryostack.io.star import ParticleTable, star_bytes
from cryostack.services.refine.results import HeteroResult, HomoResult

PARTICLES_STAR = "particles.star"
CLASSES_CSV = "classes.csv"
FSC_CSV = "fsc.csv"
HETERO_PNG = "hetero.png"
HOMO_PNG = "homo.png"
MAP_MRC = "map.mrc"
HALF_MAP_A_MRC = "half_map_a.mrc"
HALF_MAP_B_MRC = "half_map_b.mrc"
MASK_MRC = "mask.mrc"

Write = Callable[[str, bytes], str]


def volume_name(class_number: int) -> str:
    """File name of a class volume, e.g. ``class_001.mrc``."""
    return f"class_{class_number:03d}.mrc"


def half_map_name(class_number: int, half: str) -> str:
    """File name of a class half-map, ``half`` "a" or "b", e.g. ``class_001_half_a.mrc``."""
    return f"class_{class_number:03d}_half_{half}.mrc"


def _pose_columns(result: HeteroResult | HomoResult) -> dict[str, np.ndarray]:
    """The columns every refinement adds: pose, origin in Å and half-set (1 or 2)."""
    euler = result.euler_deg  # (N, 3) rot, tilt, psi in degrees
    origin = result.origin_xy_a  # (N, 2) x, y in Å
    return {
        "rlnAngleRot": euler[:, 0],
        "rlnAngleTilt": euler[:, 1],
        "rlnAnglePsi": euler[:, 2],
        "rlnOriginXAngst": origin[:, 0],
        "rlnOriginYAngst": origin[:, 1],
        "rlnRandomSubset": result.half_set.astype(np.int64) + 1,
    }


def hetero_particles_table(table: ParticleTable, result: HeteroResult) -> ParticleTable:
    """The input particles with class (the request's order, from 1), pose, origin, half-set and class posterior."""
    best = result.best_class
    return table.with_columns({
        "rlnClassNumber": best.astype(np.int64) + 1,
        **_pose_columns(result),
        "rlnMaxValueProbDistribution": result.class_posteriors[np.arange(best.size), best].astype(np.float64),
    })


def homo_particles_table(table: ParticleTable, result: HomoResult) -> ParticleTable:
    """The input particles with pose, origin and half-set."""
    return table.with_columns(_pose_columns(result))


def class_table(result: HeteroResult) -> pd.DataFrame:
    """One row per class: number, files, particle count, mean posterior and gold-standard resolution (Å)."""
    count = result.class_posteriors.shape[1]
    numbers = np.arange(1, count + 1)
    return pd.DataFrame({
        "class_number": numbers,
        "volume": [volume_name(n) for n in numbers],
        "half_map_a": [half_map_name(n, "a") for n in numbers],
        "half_map_b": [half_map_name(n, "b") for n in numbers],
        "particle_count": result.class_sizes,
        "occupancy_fraction": result.class_posteriors.mean(axis=0, dtype=np.float64),
        "gsfsc_resolution_a": np.asarray(result.resolution_a, dtype=np.float64),
    })


def _shell_columns(shells: int, box_px: int, pixel_size_a: float) -> dict[str, np.ndarray]:
    """Shell number, frequency (1/Å) and resolution (Å; inf at shell 0) of each FSC shell."""
    frequencies = shell_frequencies_inv_a(box_px, pixel_size_a)
    if frequencies.size != shells:
        raise ValueError(f"{shells} FSC shells do not fit box {box_px} ({frequencies.size} shells)")
    with np.errstate(divide="ignore"):
        resolution = 1.0 / frequencies
    return {"shell": np.arange(shells), "frequency_inv_a": frequencies, "resolution_a": resolution}


def hetero_fsc_table(result: HeteroResult) -> pd.DataFrame:
    """Half-map FSC of every class per shell: shell, frequency_inv_a, resolution_a, class_1 .. class_K."""
    columns = _shell_columns(result.fsc.shape[1], result.volumes.shape[-1], result.pixel_size_a)
    columns.update({f"class_{k + 1}": result.fsc[k] for k in range(result.fsc.shape[0])})
    return pd.DataFrame(columns)


def homo_fsc_table(result: HomoResult) -> pd.DataFrame:
    """Half-map FSC per shell: shell, frequency_inv_a, resolution_a, unmasked, masked, corrected."""
    columns = _shell_columns(result.fsc_unmasked.size, result.map.shape[-1], result.pixel_size_a)
    columns.update({"unmasked": result.fsc_unmasked, "masked": result.fsc_masked, "corrected": result.fsc_corrected})
    return pd.DataFrame(columns)


def _show_slice(axes: Axes, panel: np.ndarray, title: str) -> None:
    """A 2D slice in grey, contrast from its percentiles."""
    axes.set_axis_off()
    low, high = np.percentile(panel, [1.0, 99.5])
    axes.imshow(panel, cmap="gray", origin="lower", vmin=low, vmax=high if high > low else low + 1.0,
                interpolation="nearest")
    axes.set_title(title, fontsize=7, pad=2)


def _central_slices(volume: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The central z, y and x sections of a (D, D, D) volume indexed [z, y, x]."""
    centre = volume.shape[0] // 2
    return volume[centre], volume[:, centre, :], volume[:, :, centre]


def _plot_fsc(axes: Axes, frequencies: np.ndarray, curves: dict[str, np.ndarray]) -> None:
    """FSC curves against frequency (1/Å) with the 0.143 threshold."""
    for label, curve in curves.items():
        axes.plot(frequencies, curve, linewidth=1.2, label=label)
    axes.axhline(HALF_MAP_THRESHOLD, color="grey", linestyle="--", linewidth=0.8, label="0.143")
    axes.set_xlim(0.0, float(frequencies[-1]))
    axes.set_ylim(-0.1, 1.05)
    axes.set_xlabel("spatial frequency (1/Å)", fontsize=8)
    axes.set_ylabel("FSC", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.legend(fontsize=7, loc="upper right")


def _resolution_label(resolution_a: float) -> str:
    return f"{resolution_a:.1f} Å" if np.isfinite(resolution_a) else "n/a"


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def hetero_report_png(result: HeteroResult, *, tile_in: float = 1.3) -> bytes:
    """A PNG with one row of central slices (z, y, x) per class and every class's FSC curve beside them."""
    count = result.volumes.shape[0]
    figure = Figure(figsize=(3 * tile_in + 4.6, max(count * (tile_in + 0.3), 3.2)), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(count, 4, width_ratios=(1.0, 1.0, 1.0, 3.6 / tile_in))
    sizes = result.class_sizes
    for row in range(count):
        slices = _central_slices(result.volumes[row])
        for column, (panel, axis) in enumerate(zip(slices, "zyx", strict=True)):
            axes = figure.add_subplot(grid[row, column])
            _show_slice(axes, panel, f"slice {axis}=0")
            if column == 0:
                axes.text(-0.08, 0.5, f"class {row + 1}\n{int(sizes[row])} particles\n"
                                      f"{_resolution_label(result.resolution_a[row])}",
                          transform=axes.transAxes, ha="right", va="center", fontsize=7)
    frequencies = shell_frequencies_inv_a(result.volumes.shape[-1], result.pixel_size_a)
    _plot_fsc(figure.add_subplot(grid[:, 3]), frequencies,
              {f"class {k + 1}": result.fsc[k] for k in range(count)})
    figure.subplots_adjust(left=0.11, right=0.98, bottom=0.14 if count < 3 else 0.08, top=0.94, wspace=0.3,
                           hspace=0.35)
    return _png(figure)


def homo_report_png(result: HomoResult) -> bytes:
    """A PNG with the half-map FSC curves (unmasked, masked, corrected; the 0.143 line) over the map's slices."""
    figure = Figure(figsize=(7.0, 6.0), dpi=100)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 3, height_ratios=(1.3, 1.0))
    frequencies = shell_frequencies_inv_a(result.map.shape[-1], result.pixel_size_a)
    fsc_axes = figure.add_subplot(grid[0, :])
    _plot_fsc(fsc_axes, frequencies,
              {"unmasked": result.fsc_unmasked, "masked": result.fsc_masked, "corrected": result.fsc_corrected})
    fsc_axes.set_title(f"GSFSC resolution {_resolution_label(result.resolution_a)} "
                       f"(unmasked {_resolution_label(result.unmasked_resolution_a)}), "
                       f"{result.iteration_count} iterations", fontsize=9)
    for column, (panel, axis) in enumerate(zip(_central_slices(result.map), "zyx", strict=True)):
        _show_slice(figure.add_subplot(grid[1, column]), panel, f"map slice {axis}=0")
    figure.subplots_adjust(left=0.09, right=0.98, bottom=0.03, top=0.94, hspace=0.3, wspace=0.05)
    return _png(figure)


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """A table as CSV text."""
    return frame.to_csv(index=False, float_format="%.6g").encode()


def _mrc(write: Write, name: str, volume: np.ndarray, pixel_size_a: float) -> str:
    return write(name, encode_mrc(volume, pixel_size_a, is_stack=False, name=name))


def write_hetero_outputs(write: Write, table: ParticleTable, result: HeteroResult) -> dict[str, str]:
    """Write every heterogeneous-refinement output with ``write(relpath, data) -> uri``; the URIs by file name."""
    uris = {}
    for k in range(result.volumes.shape[0]):
        number = k + 1
        uris[volume_name(number)] = _mrc(write, volume_name(number), result.volumes[k], result.pixel_size_a)
        for half, name in enumerate((half_map_name(number, "a"), half_map_name(number, "b"))):
            uris[name] = _mrc(write, name, result.half_maps[k, half], result.pixel_size_a)
    uris[PARTICLES_STAR] = write(PARTICLES_STAR, star_bytes(hetero_particles_table(table, result)))
    uris[CLASSES_CSV] = write(CLASSES_CSV, csv_bytes(class_table(result)))
    uris[FSC_CSV] = write(FSC_CSV, csv_bytes(hetero_fsc_table(result)))
    uris[HETERO_PNG] = write(HETERO_PNG, hetero_report_png(result))
    return uris


def write_homo_outputs(write: Write, table: ParticleTable, result: HomoResult) -> dict[str, str]:
    """Write every homogeneous-refinement output with ``write(relpath, data) -> uri``; the URIs by file name."""
    uris = {
        MAP_MRC: _mrc(write, MAP_MRC, result.map, result.pixel_size_a),
        HALF_MAP_A_MRC: _mrc(write, HALF_MAP_A_MRC, result.half_maps[0], result.pixel_size_a),
        HALF_MAP_B_MRC: _mrc(write, HALF_MAP_B_MRC, result.half_maps[1], result.pixel_size_a),
        MASK_MRC: _mrc(write, MASK_MRC, result.mask, result.pixel_size_a),
    }
    uris[PARTICLES_STAR] = write(PARTICLES_STAR, star_bytes(homo_particles_table(table, result)))
    uris[FSC_CSV] = write(FSC_CSV, csv_bytes(homo_fsc_table(result)))
    uris[HOMO_PNG] = write(HOMO_PNG, homo_report_png(result))
    return uris
