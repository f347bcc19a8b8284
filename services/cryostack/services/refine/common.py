"""What heterogeneous and homogeneous refinement share: volumes on the working box, streamed batches, the noise
model, search steps sized to the resolution, maps back on the particles' box, and the run state's serialisation.

Particles are never held in memory as a set: each iteration reads the rows it scores from the particle source
(ranged reads from the store) and transforms them to the layout's coefficients (:mod:`cryostack.core.spectra`),
so memory does not grow with the number of particles beyond a few numbers per particle (pose, shift, class).
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from cryostack.core.backend import to_host
from cryostack.core.ctf import CtfParameters
from cryostack.core.filters import lowpass_response
from cryostack.core.fourier import (
    fft3_centered,
    fourier_crop_3d,
    fourier_pad_3d,
    ifft3_centered,
    resolution_to_shell,
    shell_to_resolution_a,
)
from cryostack.core.fsc import resolution_at_threshold
from cryostack.core.poses import shift_step_px, so3_level_for_step
from cryostack.core.sources import ParticleSource
from cryostack.core.spectra import ParticleBatch, SpectralLayout, fill_empty_shells, transform_batch
from cryostack.errors import InvalidArgumentError

# Fraction of the box diameter the particle is assumed to span when sizing the angular sampling.
PARTICLE_DIAMETER_FRACTION = 0.6
# Radius of the global translational search, as a fraction of the box.
MAX_SHIFT_FRACTION = 0.1
# Levels of the global SO(3) search (level 1: 30°, level 2: 15°); a refining pass adds one level (children).
MIN_GLOBAL_LEVEL = 1
MAX_GLOBAL_LEVEL = 2
# Shells searched beyond the FSC-0.143 resolution of the current maps, so the next iteration can improve on it.
RESOLUTION_MARGIN_SHELLS = 2.0
# Reach of a local search, in steps either way, and its finest steps.
LOCAL_STEPS = 2.0
MIN_ANGULAR_STEP_DEG = 0.5
MIN_SHIFT_STEP_PX = 0.1
# Images per streamed batch of a full pass.
PASS_BATCH = 1000
# Memory of the running noise estimate of the online iterations, in images (cryoSPARC's "noise initw").
NOISE_MEMORY_IMAGES = 5000.0


def working_volume(volume: np.ndarray, layout: SpectralLayout, lowpass_resolution_a: float | None,
                   xp: ModuleType = np) -> Any:
    """A (D, D, D) map on the layout's working box (D_w³ float32 on ``xp``), low-passed when a resolution is given.

    The transform is cropped without rescaling: integer frequencies keep their values, so projections of the
    working-box map match the particles' transforms (:mod:`cryostack.core.fourier`).
    """
    ft = fourier_crop_3d(fft3_centered(xp.asarray(volume, dtype=np.float32)), layout.working_box_px)
    if lowpass_resolution_a is not None:
        ft = ft * lowpass_response(layout.working_box_px, layout.working_pixel_size_a, lowpass_resolution_a, 3,
                                   xp=xp)
    return xp.asarray(ifft3_centered(ft).real, dtype=np.float32)


def to_particle_box(volume: Any, box_px: int) -> np.ndarray:
    """A working-box map (D_w³) Fourier-padded back to the particles' box: host (D, D, D) float32."""
    return to_host(fourier_pad_3d(fft3_centered(volume), box_px))


def pad_shells(curve: np.ndarray, box_px: int) -> np.ndarray:
    """A per-shell curve of the working box extended with zeros to shells 0 .. D // 2 of the particles' box."""
    out = np.zeros(box_px // 2 + 1)
    out[: min(curve.size, out.size)] = curve[: out.size]
    return out


def read_batch(particles: ParticleSource, rows: np.ndarray, layout: SpectralLayout, ctf: CtfParameters,
               half_set: np.ndarray, xp: ModuleType) -> ParticleBatch:
    """Particles at ``rows`` (sorted, (n,)) read from the source and transformed on ``xp``."""
    return transform_batch(particles.read(rows), layout, ctf.take(rows), half_set[rows], xp)


def iter_pass(particles: ParticleSource, layout: SpectralLayout, ctf: CtfParameters, half_set: np.ndarray,
              xp: ModuleType, batch_size: int = PASS_BATCH) -> Iterator[tuple[np.ndarray, ParticleBatch]]:
    """Every particle once, in batches: (rows (n,), batch), read ahead while the previous batch computes."""
    for rows, images in particles.iter_batches(np.arange(len(particles)), batch_size):
        rows = np.asarray(rows)
        yield rows, transform_batch(images, layout, ctf.take(rows), half_set[rows], xp)


def half_sets(given: np.ndarray | None, n_particles: int, rng: np.random.Generator) -> np.ndarray:
    """Half-set labels (N,) int64 0 or 1: ``given`` when the particles carry a split, else a draw from ``rng``."""
    if given is None:
        return rng.integers(0, 2, n_particles)
    labels = np.asarray(given, dtype=np.int64)
    if labels.shape != (n_particles,) or not np.all((labels == 0) | (labels == 1)):
        raise InvalidArgumentError("half_set", f"expected {n_particles} labels, each 0 or 1")
    return labels


def sub_batch(batch: ParticleBatch, members: np.ndarray, xp: ModuleType) -> ParticleBatch:
    """The particles ``members`` (m,) of a batch."""
    return ParticleBatch(coefficients=batch.coefficients[xp.asarray(members)], ctf=batch.ctf.take(members),
                         half_set=batch.half_set[members])


def image_power(batch: ParticleBatch, layout: SpectralLayout) -> np.ndarray:
    """Mean |X|² per coefficient and shell (n_shells,) of a batch's images: a starting noise power (signal + noise)."""
    power = to_host((batch.coefficients.real**2 + batch.coefficients.imag**2).mean(axis=0, dtype=np.float64))
    counts = layout.shell_count(layout.n_coefficients)
    return fill_empty_shells(np.where(counts > 0, layout.shell_sum(power) / np.maximum(counts, 1), 0.0))


def residual_shell_power(layout: SpectralLayout, residual_power: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-coefficient residual power summed over images, averaged per shell (n_shells,), and the covered shells."""
    counts = layout.shell_count(count)
    covered = counts > 0
    return layout.shell_sum(to_host(residual_power)) / np.maximum(counts, 1), covered


def particle_radius_a(layout: SpectralLayout) -> float:
    """Radius in Å the particle is assumed to have (a fraction of the box)."""
    return 0.5 * PARTICLE_DIAMETER_FRACTION * layout.box_px * layout.pixel_size_a


def global_level(layout: SpectralLayout, resolution_a: float) -> int:
    """Level of the global SO(3) grid: a step that moves the particle's rim by about the resolution."""
    step_deg = math.degrees(resolution_a / particle_radius_a(layout))
    return int(min(max(so3_level_for_step(step_deg), MIN_GLOBAL_LEVEL), MAX_GLOBAL_LEVEL))


def local_steps(layout: SpectralLayout, resolution_a: float, local_iteration: int) -> tuple[float, float]:
    """Angular (deg) and shift (px) steps of a local search: the rim moves by the resolution / π per angular step,
    the shift step is the resolution's, and both halve with each local iteration (down to
    :data:`MIN_ANGULAR_STEP_DEG` and :data:`MIN_SHIFT_STEP_PX`)."""
    scale = 0.5 ** max(local_iteration, 0)
    angular = math.degrees(resolution_a / (math.pi * particle_radius_a(layout))) * scale
    shift = shift_step_px(resolution_a, layout.pixel_size_a) * scale
    return max(angular, MIN_ANGULAR_STEP_DEG), max(shift, MIN_SHIFT_STEP_PX)


def max_shift_px(layout: SpectralLayout) -> float:
    """Radius of the global translational search in pixels."""
    return MAX_SHIFT_FRACTION * layout.box_px


def next_resolution_a(layout: SpectralLayout, fsc: np.ndarray, finest_a: float, coarsest_a: float) -> float:
    """The resolution the next iteration searches to: the FSC-0.143 point plus a margin, within the bounds."""
    pixel = layout.working_pixel_size_a
    measured = resolution_at_threshold(fsc, layout.working_box_px, pixel, 0.143)
    if not math.isfinite(measured):
        return coarsest_a
    shell = resolution_to_shell(layout.working_box_px, pixel, measured) + RESOLUTION_MARGIN_SHELLS
    ahead = shell_to_resolution_a(layout.working_box_px, pixel, shell)
    return float(min(max(ahead, finest_a), coarsest_a))


def shell_of(layout: SpectralLayout, resolution_a: float) -> float:
    """The working box's shell radius of a resolution."""
    return resolution_to_shell(layout.working_box_px, layout.working_pixel_size_a, resolution_a)


def half_map_resolution_a(layout: SpectralLayout, fsc: np.ndarray) -> float:
    """FSC-0.143 resolution (Å) of a half-map FSC on the working box."""
    return float(resolution_at_threshold(fsc, layout.working_box_px, layout.working_pixel_size_a, 0.143))


def arrays_to_bytes(**arrays: Any) -> bytes:
    """Serialise named arrays (host or device) as ``.npz`` (no pickle)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: to_host(value) if not np.isscalar(value) else np.asarray(value)
                        for name, value in arrays.items()})
    return buffer.getvalue()


def arrays_from_bytes(payload: bytes) -> dict[str, np.ndarray]:
    """Read back what :func:`arrays_to_bytes` wrote (host arrays)."""
    with np.load(io.BytesIO(payload), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}
